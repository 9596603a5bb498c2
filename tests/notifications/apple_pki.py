"""A throwaway Apple-shaped PKI for tests: root → intermediate (Apple WWDR OID)
→ leaf (Apple receipt-signing OID), and ES256 JWS with an x5c header, as the
App Store signs notifications and transactions."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

LEAF_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.11.1")
INTERMEDIATE_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.2.1")


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    oid: x509.ObjectIdentifier | None,
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if oid is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, b"\x05\x00"), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class ApplePki:
    root: x509.Certificate
    intermediate: x509.Certificate
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls) -> ApplePki:
        root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
        root = _cert("Test Root", root_key, "Test Root", root_key, ca=True, oid=None)
        inter = _cert("Test WWDR", inter_key, "Test Root", root_key, ca=True, oid=INTERMEDIATE_OID)
        leaf = _cert("Test Signer", leaf_key, "Test WWDR", inter_key, ca=False, oid=LEAF_OID)
        return cls(root, inter, leaf, leaf_key)

    def write_root(self, path: Path) -> Path:
        path.write_bytes(self.root.public_bytes(Encoding.DER))
        return path

    def sign(self, payload: dict[str, Any]) -> str:
        x5c = [
            base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in (self.leaf, self.intermediate, self.root)
        ]
        return jwt.encode(payload, self.leaf_key, algorithm="ES256", headers={"x5c": x5c})


def transaction(
    transaction_id: str,
    *,
    product_id: str = "coins_100",
    app_account_token: str | None = None,
    bundle_id: str = "com.coinstore.app",
    environment: str = "Sandbox",
    quantity: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp() * 1000)
    payload: dict[str, Any] = {
        "transactionId": transaction_id,
        "originalTransactionId": transaction_id,
        "bundleId": bundle_id,
        "productId": product_id,
        "type": "Consumable",
        "quantity": quantity,
        "purchaseDate": now,
        "originalPurchaseDate": now,
        "signedDate": now,
        "inAppOwnershipType": "PURCHASED",
        "environment": environment,
        "storefront": "USA",
        "storefrontId": "143441",
        "price": 990,
        "currency": "USD",
        "transactionReason": "PURCHASE",
    }
    if app_account_token:
        payload["appAccountToken"] = app_account_token
    payload.update(extra)
    return payload


def notification(
    pki: ApplePki,
    notification_type: str,
    signed_transaction: str | None,
    *,
    bundle_id: str = "com.coinstore.app",
    environment: str = "Sandbox",
    app_apple_id: int | None = 1234567890,
    notification_uuid: str | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"environment": environment, "bundleId": bundle_id, "bundleVersion": "1"}
    if app_apple_id is not None:
        data["appAppleId"] = app_apple_id
    if signed_transaction is not None:
        data["signedTransactionInfo"] = signed_transaction
    payload = {
        "notificationType": notification_type,
        "notificationUUID": notification_uuid or str(uuid.uuid4()),
        "version": "2.0",
        "signedDate": int(datetime.now(UTC).timestamp() * 1000),
        "data": data,
    }
    return {"signedPayload": pki.sign(payload)}
