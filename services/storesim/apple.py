"""App Store stand-in of the store simulator.

What a device and Apple's servers would give coinstore, on Apple's wire formats:

- its own PKI (root CA → intermediate → leaf) with Apple's marker OIDs and the
  X.509 extensions that strict path validation needs; the root certificate is
  written to ``<state_dir>/apple/root.der`` (what coinstore trusts in dev);
- an In-App Purchase key (``<state_dir>/apple/SubscriptionKey.p8``, key id
  ``SIMKEY0001``, issuer ``57246542-96fe-1a63-e053-0824d011072a``) whose JWTs the
  API accepts, checked like Apple does (ES256, kid, aud, bid, exp ≤ 60 min after
  iat when iat is given; iat itself is not required);
- ``POST /apple/buy`` returns a signed StoreKit 2 transaction as a device gets it;
  ``POST /apple/receipt`` a legacy PKCS#7 app receipt; ``POST /apple/refund`` and
  ``POST /apple/refund/reverse`` change a transaction like Apple's refunds do;
- the App Store Server API under ``/apple/production/inApps/…`` and
  ``/apple/sandbox/inApps/…``: Get Transaction Info, Get Transaction History v2,
  Get Refund History v2, Send Consumption Information, Get Notification History;
- fault injection (``POST /apple/faults``): 429 with ``Retry-After`` (UNIX ms),
  5xx, slow answers.

Other simulator modules (the V2 notification sender) use the :class:`AppleStore`
stored in the app under :data:`APPLE_STORE`: ``store.sign(payload)`` signs any
payload as a JWS with the simulator's chain, ``store.transaction(id)`` and
``store.refund(id, …)`` read and change transactions, and
``store.log_notification(…)`` feeds Get Notification History.

It imports no coinstore service.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asn1
import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from services.storesim.config import StoresimSettings

LEAF_MARKER_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.11.1")
INTERMEDIATE_MARKER_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.2.1")
ASN1_NULL = b"\x05\x00"

BUNDLE_ID = "com.coinstore.app"
APP_APPLE_ID = 1234567890
KEY_ID = "SIMKEY0001"
ISSUER_ID = "57246542-96fe-1a63-e053-0824d011072a"
AUDIENCE = "appstoreconnect-v1"
PAGE_SIZE = 20
# Get Notification History reaches back this far.
HISTORY_DAYS = 180

ENVIRONMENTS = {"production": "Production", "sandbox": "Sandbox"}
STOREFRONT_IDS = {"USA": "143441", "GBR": "143444", "DEU": "143443", "FRA": "143442", "JPN": "143462", "TUR": "143480"}
# Default prices (milliunits of USD) for the dev catalog's packs.
DEFAULT_PRICES = {
    "com.coinstore.coins.70": 1290,
    "com.coinstore.coins.350": 6490,
    "com.coinstore.coins.1400": 26990,
    "com.coinstore.coins.7000": 129990,
}
PRODUCT_TYPES = {
    "CONSUMABLE": "Consumable",
    "NON_CONSUMABLE": "Non-Consumable",
    "AUTO_RENEWABLE": "Auto-Renewable Subscription",
    "NON_RENEWABLE": "Non-Renewing Subscription",
}
DELIVERY_STATUSES = {
    "DELIVERED",
    "UNDELIVERED_QUALITY_ISSUE",
    "UNDELIVERED_WRONG_ITEM",
    "UNDELIVERED_SERVER_OUTAGE",
    "UNDELIVERED_OTHER",
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def now_ms() -> int:
    return int(time.time() * 1000)


# --- PKI ------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A three-level chain like Apple's: root CA, WWDR-like intermediate, signing leaf."""

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.leaf, self.intermediate, self.root]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "coinstore store simulator"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def make_pki(
    *,
    name: str = "Simulated Apple",
    leaf_marker: bool = True,
    intermediate_marker: bool = True,
    leaf_not_before: datetime | None = None,
    leaf_not_after: datetime | None = None,
    ocsp_url: str | None = None,
    root: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None,
) -> Pki:
    """Generate a chain with the extensions strict X.509 validation expects.

    Root: critical BasicConstraints CA, critical KeyUsage keyCertSign+cRLSign,
    SKI. Intermediate: CA pathlen 0, the same KeyUsage, SKI, AKI, the WWDR marker
    (non-critical, ASN.1 NULL). Leaf: CA false, critical KeyUsage
    digitalSignature, SKI, AKI, the receipt-signing marker, a P-256 key. The
    keyword arguments build the bad vectors tests need.
    """
    now = datetime.now(UTC)
    if root is None:
        root_key = ec.generate_private_key(ec.SECP384R1())
        root_cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} Root CA - G3"))
            .issuer_name(_name(f"{name} Root CA - G3"))
            .public_key(root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=365))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA384())
        )
    else:
        root_key, root_cert = root
    intermediate_key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} Worldwide Developer Relations CA - G6"))
        .issuer_name(root_cert.subject)
        .public_key(intermediate_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=300))
        .not_valid_after(now + timedelta(days=3000))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(intermediate_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if intermediate_marker:
        builder = builder.add_extension(x509.UnrecognizedExtension(INTERMEDIATE_MARKER_OID, ASN1_NULL), critical=False)
    if ocsp_url:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess(
                [x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))]
            ),
            critical=False,
        )
    intermediate_cert = builder.sign(root_key, hashes.SHA384())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} Prod ECC Receipt Signing"))
        .issuer_name(intermediate_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(leaf_not_before or now - timedelta(days=30))
        .not_valid_after(leaf_not_after or now + timedelta(days=730))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(intermediate_key.public_key()), critical=False
        )
    )
    if leaf_marker:
        builder = builder.add_extension(x509.UnrecognizedExtension(LEAF_MARKER_OID, ASN1_NULL), critical=False)
    if ocsp_url:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess(
                [x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))]
            ),
            critical=False,
        )
    leaf_cert = builder.sign(intermediate_key, hashes.SHA384())
    return Pki(root_key, root_cert, intermediate_key, intermediate_cert, leaf_key, leaf_cert)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_or_create_pki(directory: Path) -> Pki:
    """The simulator's chain, kept in ``directory`` so restarts keep the same root."""
    directory.mkdir(parents=True, exist_ok=True)
    state = directory / "pki.pem"
    if state.exists():
        blocks = state.read_bytes().split(b"\n\n")
        keys = [serialization.load_pem_private_key(b, None) for b in blocks[0:3]]
        certs = [x509.load_pem_x509_certificate(b) for b in blocks[3:6]]
        assert all(isinstance(k, ec.EllipticCurvePrivateKey) for k in keys)
        pki = Pki(keys[0], certs[0], keys[1], certs[1], keys[2], certs[2])  # type: ignore[arg-type]
    else:
        pki = make_pki()
        parts = [_pem_key(pki.root_key), _pem_key(pki.intermediate_key), _pem_key(pki.leaf_key)] + [
            c.public_bytes(serialization.Encoding.PEM) for c in (pki.root, pki.intermediate, pki.leaf)
        ]
        state.write_bytes(b"\n".join(parts))
        state.chmod(0o600)
    (directory / "root.der").write_bytes(pki.root.public_bytes(serialization.Encoding.DER))
    return pki


def load_or_create_api_key(directory: Path) -> ec.EllipticCurvePrivateKey:
    """The In-App Purchase key (.p8, PKCS#8 PEM) coinstore signs API tokens with."""
    path = directory / "SubscriptionKey.p8"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(_pem_key(key))
    path.chmod(0o600)
    return key


# --- signing --------------------------------------------------------------


class JwsSigner:
    """Signs payloads as Apple does: ES256, ``x5c`` = [leaf, intermediate, root]
    in standard base64 DER, no ``typ``."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]) -> None:
        self._key = key
        self._x5c = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]

    def sign(self, payload: Mapping[str, Any], header: Mapping[str, Any] | None = None) -> str:
        head = {"alg": "ES256", "x5c": self._x5c, **(header or {})}
        signing_input = (
            _b64url(json.dumps(head, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(payload, separators=(",", ":")).encode())
        )
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


# --- legacy receipts -------------------------------------------------------


def _attribute(encoder: asn1.Encoder, kind: int, value: bytes) -> None:
    encoder.enter(asn1.Numbers.Sequence)
    encoder.write(kind, asn1.Numbers.Integer)
    encoder.write(1, asn1.Numbers.Integer)
    encoder.write(value, asn1.Numbers.OctetString)
    encoder.leave()


def _der(value: Any, number: int) -> bytes:
    encoder = asn1.Encoder()
    encoder.start()
    encoder.write(value, number)
    return bytes(encoder.output())


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_app_receipt(pki: Pki, bundle_id: str, transactions: list[Mapping[str, Any]]) -> str:
    """A base64 PKCS#7 signedData app receipt (Receipt Validation Programming Guide
    layout): a SET of (type, version, value) attributes, in-app purchases as type
    17 holding their own SET (1701 quantity, 1702 product id, 1703 transaction id,
    1704 purchase date, 1705 original transaction id)."""
    encoder = asn1.Encoder()
    encoder.start()
    encoder.enter(asn1.Numbers.Set)
    _attribute(encoder, 2, _der(bundle_id, asn1.Numbers.UTF8String))
    _attribute(encoder, 3, _der("1", asn1.Numbers.UTF8String))
    _attribute(encoder, 12, _der(_rfc3339(now_ms()), asn1.Numbers.IA5String))
    for tx in transactions:
        inner = asn1.Encoder()
        inner.start()
        inner.enter(asn1.Numbers.Set)
        _attribute(inner, 1701, _der(int(tx["quantity"]), asn1.Numbers.Integer))
        _attribute(inner, 1702, _der(tx["productId"], asn1.Numbers.UTF8String))
        _attribute(inner, 1703, _der(tx["transactionId"], asn1.Numbers.UTF8String))
        _attribute(inner, 1704, _der(_rfc3339(tx["purchaseDate"]), asn1.Numbers.IA5String))
        _attribute(inner, 1705, _der(tx["originalTransactionId"], asn1.Numbers.UTF8String))
        inner.leave()
        _attribute(encoder, 17, bytes(inner.output()))
    encoder.leave()
    content = bytes(encoder.output())
    signed = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(content)
        .add_signer(pki.leaf, pki.leaf_key, hashes.SHA256())
        .add_certificate(pki.intermediate)
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    )
    return base64.b64encode(signed).decode()


# --- the store -------------------------------------------------------------


@dataclass
class Fault:
    """An injected failure for the next ``count`` API calls whose path contains ``path``."""

    status: int = 0
    count: int = 1
    delay_seconds: float = 0.0
    retry_after_ms: int = 0
    path: str = ""


@dataclass
class Transaction:
    payload: dict[str, Any]
    customer: str
    refund_order: int = 0


@dataclass
class NotificationRecord:
    signed_payload: str
    notification_type: str
    transaction_id: str
    environment: str
    first_send_ms: int
    attempts: list[dict[str, Any]] = field(default_factory=list)


class AppleStore:
    """The simulator's App Store state: signer, transactions, refunds, faults."""

    def __init__(
        self,
        pki: Pki,
        api_public_key: ec.EllipticCurvePublicKey,
        *,
        bundle_id: str = BUNDLE_ID,
        app_apple_id: int = APP_APPLE_ID,
        key_id: str = KEY_ID,
        issuer_id: str = ISSUER_ID,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.pki = pki
        self.signer = JwsSigner(pki.leaf_key, pki.chain)
        self.api_public_key = api_public_key
        self.bundle_id = bundle_id
        self.app_apple_id = app_apple_id
        self.key_id = key_id
        self.issuer_id = issuer_id
        self.clock = clock
        self.transactions: dict[str, Transaction] = {}
        self.faults: list[Fault] = []
        self.notifications: list[NotificationRecord] = []
        self.api_calls: list[tuple[str, str, dict[str, Any]]] = []
        self.consumption: dict[str, list[dict[str, Any]]] = {}
        self._ids = itertools.count(2_000_000_000_000_000 + secrets.randbelow(10**12))
        self._refunds = itertools.count(1)

    # -- signing and state, for other simulator modules and tests --

    def sign(self, payload: Mapping[str, Any], header: Mapping[str, Any] | None = None) -> str:
        """Sign any payload (transaction, notification) as a JWS with the simulator's chain."""
        return self.signer.sign(payload, header)

    def transaction(self, transaction_id: str) -> dict[str, Any] | None:
        """The current decoded transaction payload, or None."""
        found = self.transactions.get(transaction_id)
        return dict(found.payload) if found else None

    def signed_transaction(self, transaction_id: str) -> str:
        """The transaction as Apple serves it now: re-signed with a fresh signedDate."""
        payload = dict(self.transactions[transaction_id].payload)
        payload["signedDate"] = self.clock()
        return self.sign(payload)

    def buy(
        self,
        product_id: str,
        *,
        app_account_token: str | None = None,
        quantity: int = 1,
        environment: str = "Production",
        storefront: str = "USA",
        price: int | None = None,
        currency: str = "USD",
        product_type: str = "Consumable",
        bundle_id: str | None = None,
        customer: str | None = None,
    ) -> tuple[str, str]:
        """A purchase as the device sees it: (transactionId, signed transaction JWS)."""
        transaction_id = str(next(self._ids))
        moment = self.clock()
        payload: dict[str, Any] = {
            "transactionId": transaction_id,
            "originalTransactionId": transaction_id,
            "bundleId": bundle_id or self.bundle_id,
            "productId": product_id,
            "purchaseDate": moment,
            "originalPurchaseDate": moment,
            "quantity": quantity,
            "type": product_type,
            "inAppOwnershipType": "PURCHASED",
            "signedDate": moment,
            "environment": environment,
            "transactionReason": "PURCHASE",
            "storefront": storefront,
            "storefrontId": STOREFRONT_IDS.get(storefront, "143441"),
            "price": price if price is not None else DEFAULT_PRICES.get(product_id, 990) * quantity,
            "currency": currency,
            "appTransactionId": str(uuid.uuid5(uuid.NAMESPACE_OID, customer or app_account_token or "anon")),
        }
        if app_account_token:
            payload["appAccountToken"] = app_account_token
        self.transactions[transaction_id] = Transaction(payload, customer or app_account_token or transaction_id)
        return transaction_id, self.sign(payload)

    def refund(
        self,
        transaction_id: str,
        *,
        reason: int = 0,
        revocation_type: str = "REFUND_FULL",
        percentage: int | None = None,
    ) -> dict[str, Any]:
        """Revoke (refund) a transaction as Apple does; returns the new payload."""
        tx = self.transactions[transaction_id]
        tx.payload["revocationDate"] = self.clock()
        tx.payload["revocationReason"] = reason
        tx.payload["revocationType"] = revocation_type
        if percentage is not None:
            tx.payload["revocationPercentage"] = percentage
        else:
            tx.payload.pop("revocationPercentage", None)
        tx.refund_order = next(self._refunds)
        return dict(tx.payload)

    def reverse_refund(self, transaction_id: str) -> dict[str, Any]:
        """Apple reversed a refund (REFUND_REVERSED): the revocation fields go away."""
        tx = self.transactions[transaction_id]
        for key in ("revocationDate", "revocationReason", "revocationType", "revocationPercentage"):
            tx.payload.pop(key, None)
        tx.refund_order = 0
        return dict(tx.payload)

    def app_receipt(self, transaction_ids: list[str]) -> str:
        """A legacy app receipt holding these (unfinished) transactions."""
        return build_app_receipt(self.pki, self.bundle_id, [self.transactions[t].payload for t in transaction_ids])

    def log_notification(
        self, signed_payload: str, notification_type: str, transaction_id: str, environment: str, result: str
    ) -> NotificationRecord:
        """Record a notification send attempt for Get Notification History."""
        for record in self.notifications:
            if record.signed_payload == signed_payload:
                record.attempts.append({"attemptDate": self.clock(), "sendAttemptResult": result})
                return record
        record = NotificationRecord(
            signed_payload,
            notification_type,
            transaction_id,
            environment,
            self.clock(),
            [{"attemptDate": self.clock(), "sendAttemptResult": result}],
        )
        self.notifications.append(record)
        return record

    def inject(self, fault: Fault) -> None:
        self.faults.append(fault)

    # -- API plumbing --

    def check_token(self, authorization: str | None) -> str | None:
        """None when the bearer token is acceptable, else why not (the API answers 401)."""
        if not authorization or not authorization.startswith("Bearer "):
            return "missing bearer token"
        token = authorization[len("Bearer ") :]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return "malformed token"
        if header.get("alg") != "ES256":
            return "alg must be ES256"
        if header.get("kid") != self.key_id:
            return "unknown kid"
        try:
            claims = jwt.decode(
                token,
                self.api_public_key,
                algorithms=["ES256"],
                audience=AUDIENCE,
                issuer=self.issuer_id,
                options={"require": ["exp", "aud", "iss"]},
            )
        except jwt.PyJWTError as exc:
            return f"invalid token: {exc}"
        if claims.get("bid") != self.bundle_id:
            return "bid does not match the app"
        iat = claims.get("iat")
        if iat is not None and int(claims["exp"]) - int(iat) > 3600:
            return "exp is more than 60 minutes after iat"
        if iat is None and int(claims["exp"]) - time.time() > 3600:
            return "exp is more than 60 minutes away"
        return None

    async def apply_fault(self, path: str) -> web.Response | None:
        for fault in self.faults:
            if fault.count > 0 and fault.path in path:
                fault.count -= 1
                if fault.delay_seconds:
                    await asyncio.sleep(fault.delay_seconds)
                if fault.status == 429:
                    retry_at = self.clock() + fault.retry_after_ms
                    return web.json_response(
                        {"errorCode": 4290000, "errorMessage": "Rate limit exceeded."},
                        status=429,
                        headers={"Retry-After": str(retry_at)},
                    )
                if fault.status >= 500:
                    return web.json_response(
                        {"errorCode": 5000000, "errorMessage": "An unknown error occurred."}, status=fault.status
                    )
                return None
        self.faults = [f for f in self.faults if f.count > 0]
        return None

    def customer_transactions(self, transaction_id: str, environment: str) -> list[Transaction] | None:
        found = self.transactions.get(transaction_id)
        if found is None or found.payload["environment"] != environment:
            return None
        return [
            t
            for t in self.transactions.values()
            if t.customer == found.customer and t.payload["environment"] == environment
        ]


APPLE_STORE = web.AppKey("apple_store", AppleStore)


def _error(status: int, code: int, message: str) -> web.Response:
    return web.json_response({"errorCode": code, "errorMessage": message}, status=status)


def _not_found() -> web.Response:
    return _error(404, 4040010, "Transaction id not found.")


def _page(token: str) -> int:
    try:
        return int(base64.urlsafe_b64decode(token.encode() + b"==").decode()) if token else 0
    except ValueError:
        return -1


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(str(offset).encode()).decode().rstrip("=")


def _api(handler: Callable[[web.Request, AppleStore, str], Any]) -> Callable[[web.Request], Any]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        store = request.app[APPLE_STORE]
        env_segment = request.match_info["env"]
        environment = ENVIRONMENTS.get(env_segment)
        if environment is None:
            raise web.HTTPNotFound()
        store.api_calls.append((request.method, request.path, dict(request.query)))
        faulted = await store.apply_fault(request.path)
        if faulted is not None:
            return faulted
        problem = store.check_token(request.headers.get("Authorization"))
        if problem is not None:
            return web.Response(status=401, text="Unauthenticated\n\nRequest ID: SIM." + problem.replace(" ", "_"))
        response: web.StreamResponse = await handler(request, store, environment)
        return response

    return wrapped


async def _transaction_info(request: web.Request, store: AppleStore, environment: str) -> web.Response:
    transaction_id = request.match_info["transaction_id"]
    if not transaction_id.isdigit():
        return _error(400, 4000006, "Invalid transaction id.")
    found = store.transactions.get(transaction_id)
    if found is None or found.payload["environment"] != environment:
        return _not_found()
    return web.json_response({"signedTransactionInfo": store.signed_transaction(transaction_id)})


async def _history(request: web.Request, store: AppleStore, environment: str) -> web.Response:
    transaction_id = request.match_info["transaction_id"]
    if not transaction_id.isdigit():
        return _error(400, 4000006, "Invalid transaction id.")
    transactions = store.customer_transactions(transaction_id, environment)
    if transactions is None:
        return _not_found()
    query = request.query
    types = query.getall("productType", [])
    if any(t not in PRODUCT_TYPES for t in types):
        return _error(400, 4000022, "Invalid product type.")
    wanted_types = {PRODUCT_TYPES[t] for t in types}
    product_ids = set(query.getall("productId", []))
    start = int(query.get("startDate", "0") or 0)
    end = int(query.get("endDate", "0") or 0)
    revoked = query.get("revoked")
    selected = [
        t
        for t in transactions
        if (not wanted_types or t.payload["type"] in wanted_types)
        and (not product_ids or t.payload["productId"] in product_ids)
        and t.payload["purchaseDate"] >= start
        and (not end or t.payload["purchaseDate"] < end)
        and (revoked is None or ("revocationDate" in t.payload) == (revoked == "true"))
    ]
    selected.sort(key=lambda t: t.payload["purchaseDate"], reverse=query.get("sort") == "DESCENDING")
    offset = _page(query.get("revision", ""))
    if offset < 0:
        return _error(400, 4000005, "Invalid request revision.")
    page = selected[offset : offset + PAGE_SIZE]
    return web.json_response(
        {
            "revision": _token(offset + len(page)),
            "hasMore": offset + len(page) < len(selected),
            "bundleId": store.bundle_id,
            "appAppleId": store.app_apple_id,
            "environment": environment,
            "signedTransactions": [store.signed_transaction(t.payload["transactionId"]) for t in page],
        }
    )


async def _refund_history(request: web.Request, store: AppleStore, environment: str) -> web.Response:
    transaction_id = request.match_info["transaction_id"]
    transactions = store.customer_transactions(transaction_id, environment)
    if transactions is None:
        return _not_found()
    refunded = sorted((t for t in transactions if t.refund_order), key=lambda t: t.refund_order)
    offset = _page(request.query.get("revision", ""))
    if offset < 0:
        return _error(400, 4000005, "Invalid request revision.")
    page = refunded[offset : offset + PAGE_SIZE]
    return web.json_response(
        {
            "signedTransactions": [store.signed_transaction(t.payload["transactionId"]) for t in page],
            "revision": _token(offset + len(page)),
            "hasMore": offset + len(page) < len(refunded),
        }
    )


async def _consumption(request: web.Request, store: AppleStore, environment: str) -> web.Response:
    transaction_id = request.match_info["transaction_id"]
    found = store.transactions.get(transaction_id)
    if found is None or found.payload["environment"] != environment:
        return _not_found()
    try:
        body = await request.json()
    except ValueError:
        return _error(400, 4000000, "Bad request.")
    if body.get("customerConsented") is not True:
        return _error(400, 4000035, "Invalid customer consented.")
    if not isinstance(body.get("sampleContentProvided"), bool):
        return _error(400, 4000041, "Invalid sample content provided.")
    if body.get("deliveryStatus") not in DELIVERY_STATUSES:
        return _error(400, 4000036, "Invalid delivery status.")
    percentage = body.get("consumptionPercentage")
    if percentage is not None and not (isinstance(percentage, int) and 0 <= percentage <= 100_000):
        return _error(400, 4000000, "Consumption percentage out of range.")
    if body["deliveryStatus"] != "DELIVERED" and percentage:
        return _error(400, 4000000, "Undelivered consumption percentage must be zero.")
    store.consumption.setdefault(transaction_id, []).append(body)
    return web.Response(status=202)


async def _notification_history(request: web.Request, store: AppleStore, environment: str) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, 4000000, "Bad request.")
    start, end = body.get("startDate"), body.get("endDate")
    if not isinstance(start, int) or not isinstance(end, int) or end <= start:
        return _error(400, 4000000, "Invalid start or end date.")
    if start < store.clock() - HISTORY_DAYS * 86_400_000:
        return _error(400, 4000000, f"startDate is more than {HISTORY_DAYS} days ago.")
    if body.get("notificationType") and body.get("transactionId"):
        return _error(400, 4000000, "Give notificationType or transactionId, not both.")
    selected = [
        n
        for n in store.notifications
        if n.environment == environment
        and start <= n.first_send_ms < end
        and (not body.get("notificationType") or n.notification_type == body["notificationType"])
        and (not body.get("transactionId") or n.transaction_id == body["transactionId"])
        and (not body.get("onlyFailures") or all(a["sendAttemptResult"] != "SUCCESS" for a in n.attempts))
    ]
    offset = _page(request.query.get("paginationToken", ""))
    if offset < 0:
        return _error(400, 4000014, "Invalid pagination token.")
    page = selected[offset : offset + PAGE_SIZE]
    more = offset + len(page) < len(selected)
    answer: dict[str, Any] = {
        "notificationHistory": [{"signedPayload": n.signed_payload, "sendAttempts": n.attempts} for n in page],
        "hasMore": more,
    }
    if more:
        answer["paginationToken"] = _token(offset + len(page))
    return web.json_response(answer)


# --- device-side and control endpoints -------------------------------------


async def _buy(request: web.Request) -> web.Response:
    store = request.app[APPLE_STORE]
    body = await request.json()
    product_id = body.get("productId")
    if not isinstance(product_id, str) or not product_id:
        return web.json_response({"error": "productId is required"}, status=400)
    environment = body.get("environment", "Production")
    if environment not in ("Production", "Sandbox", "Xcode"):
        return web.json_response({"error": "environment must be Production, Sandbox or Xcode"}, status=400)
    transaction_id, signed = store.buy(
        product_id,
        app_account_token=body.get("appAccountToken"),
        quantity=int(body.get("quantity", 1)),
        environment=environment,
        storefront=body.get("storefront", "USA"),
        price=body.get("price"),
        currency=body.get("currency", "USD"),
        product_type=body.get("type", "Consumable"),
        bundle_id=body.get("bundleId"),
        customer=body.get("customer"),
    )
    return web.json_response({"transactionId": transaction_id, "signedTransaction": signed})


async def _receipt(request: web.Request) -> web.Response:
    store = request.app[APPLE_STORE]
    body = await request.json()
    ids = body.get("transactionIds") or []
    if any(i not in store.transactions for i in ids):
        return web.json_response({"error": "unknown transaction id"}, status=404)
    return web.json_response({"receipt": store.app_receipt(ids)})


async def _refund(request: web.Request) -> web.Response:
    store = request.app[APPLE_STORE]
    body = await request.json()
    transaction_id = body.get("transactionId", "")
    if transaction_id not in store.transactions:
        return web.json_response({"error": "unknown transaction id"}, status=404)
    payload = store.refund(
        transaction_id,
        reason=int(body.get("revocationReason", 0)),
        revocation_type=body.get("revocationType", "REFUND_FULL"),
        percentage=body.get("revocationPercentage"),
    )
    return web.json_response({"signedTransaction": store.sign(payload)})


async def _reverse_refund(request: web.Request) -> web.Response:
    store = request.app[APPLE_STORE]
    body = await request.json()
    transaction_id = body.get("transactionId", "")
    if transaction_id not in store.transactions:
        return web.json_response({"error": "unknown transaction id"}, status=404)
    return web.json_response({"signedTransaction": store.sign(store.reverse_refund(transaction_id))})


async def _faults(request: web.Request) -> web.Response:
    store = request.app[APPLE_STORE]
    if request.method == "DELETE":
        store.faults.clear()
        return web.json_response({"faults": 0})
    body = await request.json()
    store.inject(
        Fault(
            status=int(body.get("status", 0)),
            count=int(body.get("count", 1)),
            delay_seconds=float(body.get("delaySeconds", 0)),
            retry_after_ms=int(body.get("retryAfterMs", 1000)),
            path=str(body.get("path", "")),
        )
    )
    return web.json_response({"faults": len(store.faults)})


def create_store(state_dir: Path, **options: Any) -> AppleStore:
    """The simulator's App Store, its keys kept under ``state_dir/apple``."""
    directory = state_dir / "apple"
    pki = load_or_create_pki(directory)
    api_key = load_or_create_api_key(directory)
    return AppleStore(pki, api_key.public_key(), **options)


def add_routes(app: web.Application, store: AppleStore) -> None:
    app[APPLE_STORE] = store
    app.router.add_post("/apple/buy", _buy)
    app.router.add_post("/apple/receipt", _receipt)
    app.router.add_post("/apple/refund", _refund)
    app.router.add_post("/apple/refund/reverse", _reverse_refund)
    app.router.add_post("/apple/faults", _faults)
    app.router.add_delete("/apple/faults", _faults)
    base = "/apple/{env}/inApps"
    app.router.add_get(base + "/v1/transactions/{transaction_id}", _api(_transaction_info))
    app.router.add_get(base + "/v2/history/{transaction_id}", _api(_history))
    app.router.add_get(base + "/v2/refund/lookup/{transaction_id}", _api(_refund_history))
    app.router.add_put(base + "/v2/transactions/consumption/{transaction_id}", _api(_consumption))
    app.router.add_post(base + "/v1/notifications/history", _api(_notification_history))


def setup(app: web.Application, settings: StoresimSettings) -> None:
    """Add the App Store stand-in's routes and state to the simulator."""
    add_routes(app, create_store(settings.state_dir))
