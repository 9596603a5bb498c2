"""Differential tests of the App Store JWS verifier against Apple's own
``app-store-server-library`` (strict X.509 checks on, offline): on every vector
both accept or both refuse. coinstore's refusal reasons are asserted too.

Deliberate differences (coinstore stricter), tested separately below:
- the Apple marker extensions must be non-critical (Apple's Java library rule);
- one coinstore verifier accepts the set of environments of the policy, where
  Apple's verifier is built per environment (here both accept only Sandbox).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from appstoreserverlibrary.models.Environment import Environment as AppleEnvironment
from appstoreserverlibrary.signed_data_verifier import SignedDataVerifier, VerificationException
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.common.errors import DomainError
from services.receipts.apple.jws import AppleJwsVerifier, load_root_certificates
from services.receipts.apple.rules import ApplePolicy, check_transaction
from services.storesim.apple import JwsSigner, Pki, make_pki

BUNDLE = "com.coinstore.app"
POLICY = ApplePolicy(BUNDLE)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def transaction(**changes: Any) -> dict[str, Any]:
    now = int(time.time() * 1000)
    payload: dict[str, Any] = {
        "transactionId": "2000000123456789",
        "originalTransactionId": "2000000123456789",
        "bundleId": BUNDLE,
        "productId": "com.coinstore.coins.350",
        "purchaseDate": now,
        "originalPurchaseDate": now,
        "quantity": 1,
        "type": "Consumable",
        "inAppOwnershipType": "PURCHASED",
        "signedDate": now,
        "environment": "Sandbox",
        "transactionReason": "PURCHASE",
        "storefront": "USA",
        "storefrontId": "143441",
        "price": 6490,
        "currency": "USD",
        "appAccountToken": "7e3fb20b-4cdb-47cc-936d-99d65f608138",
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def sign(pki: Pki, payload: dict[str, Any], chain: list[x509.Certificate] | None = None, **header: Any) -> str:
    return JwsSigner(pki.leaf_key, chain if chain is not None else pki.chain).sign(payload, header)


def replace_part(jws: str, index: int, value: dict[str, Any]) -> str:
    parts = jws.split(".")
    parts[index] = b64url(json.dumps(value, separators=(",", ":")).encode())
    return ".".join(parts)


def header_of(jws: str) -> dict[str, Any]:
    part = jws.split(".")[0]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


@dataclass(frozen=True)
class Vector:
    name: str
    jws: str
    # None: both accept; else coinstore's reason (Apple just refuses).
    reason: str | None


def vectors(pki: Pki) -> list[Vector]:
    root = (pki.root_key, pki.root)
    valid = sign(pki, transaction())
    foreign = make_pki(name="Foreign")
    no_leaf_oid = make_pki(leaf_marker=False, root=root)
    no_intermediate_oid = make_pki(intermediate_marker=False, root=root)
    now = datetime.now(UTC)
    expired = make_pki(root=root, leaf_not_before=now - timedelta(days=800), leaf_not_after=now - timedelta(days=30))
    inside_old_validity = int((now - timedelta(days=100)).timestamp() * 1000)
    tampered_payload = replace_part(valid, 1, transaction(quantity=100))
    tampered_header = replace_part(valid, 0, {**header_of(valid), "kid": "x"})
    none_header = {**header_of(valid), "alg": "none"}
    alg_none = replace_part(valid, 0, none_header).rsplit(".", 1)[0] + "."
    hs_header = b64url(json.dumps({**header_of(valid), "alg": "HS256"}).encode())
    hs_payload = valid.split(".")[1]
    hs_signature = hmac.new(der(pki.leaf), f"{hs_header}.{hs_payload}".encode(), hashlib.sha256).digest()
    alg_hs256 = f"{hs_header}.{hs_payload}.{b64url(hs_signature)}"
    garbage_root = JwsSigner(pki.leaf_key, pki.chain)
    garbage_root._x5c = [*garbage_root._x5c[:2], "Z2FyYmFnZQ=="]
    no_x5c = replace_part(valid, 0, {"alg": "ES256"})
    return [
        Vector("valid", valid, None),
        Vector("tampered payload", tampered_payload, "INVALID_SIGNATURE"),
        Vector("tampered header", tampered_header, "INVALID_SIGNATURE"),
        Vector("alg none", alg_none, "UNSUPPORTED_ALGORITHM"),
        Vector("alg HS256", alg_hs256, "UNSUPPORTED_ALGORITHM"),
        Vector("foreign root", sign(foreign, transaction()), "UNTRUSTED_CHAIN"),
        Vector("leaf without Apple OID", sign(no_leaf_oid, transaction()), "MISSING_APPLE_OID"),
        Vector("intermediate without Apple OID", sign(no_intermediate_oid, transaction()), "MISSING_APPLE_OID"),
        Vector("expired leaf, signed after expiry", sign(expired, transaction()), "CERTIFICATE_EXPIRED"),
        Vector(
            "expired leaf, signed while valid",
            sign(expired, transaction(signedDate=inside_old_validity)),
            None,
        ),
        Vector("wrong bundle", sign(pki, transaction(bundleId="com.example.other")), "WRONG_BUNDLE"),
        # No "Production against a Sandbox verifier" vector: Apple's library is built for one
        # environment (a server runs one per environment); coinstore takes both signed
        # environments and decides per account who may buy in the Sandbox (service tests).
        Vector("Xcode environment", sign(pki, transaction(environment="Xcode")), "WRONG_ENVIRONMENT"),
        Vector("missing environment", sign(pki, transaction(environment=None)), "WRONG_ENVIRONMENT"),
        Vector("chain of 2", sign(pki, transaction(), chain=[pki.leaf, pki.intermediate]), "INVALID_CHAIN_LENGTH"),
        Vector("chain of 4", sign(pki, transaction(), chain=[*pki.chain, pki.root]), "INVALID_CHAIN_LENGTH"),
        Vector("no x5c", no_x5c, "INVALID_CHAIN_LENGTH"),
        Vector("unparseable x5c[2] is ignored", garbage_root.sign(transaction()), None),
        Vector("not a JWS", "a.b.c", "MALFORMED_JWS"),
        Vector("four parts", valid + ".x", "MALFORMED_JWS"),
        Vector("signature by another key", replace_signature(valid, foreign.leaf_key), "INVALID_SIGNATURE"),
    ]


def replace_signature(jws: str, key: ec.EllipticCurvePrivateKey) -> str:
    header, payload, _ = jws.split(".")
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256())))
    return f"{header}.{payload}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def apple_verdict(root_der: bytes, jws: str) -> bool:
    verifier = SignedDataVerifier([root_der], False, AppleEnvironment.SANDBOX, BUNDLE)
    assert verifier._chain_verifier.enable_strict_checks, "Apple's strict X.509 checks must be on"
    try:
        verifier.verify_and_decode_signed_transaction(jws)
    except VerificationException:
        return False
    return True


def coinstore_verdict(roots: list[x509.Certificate], jws: str) -> str | None:
    verifier = AppleJwsVerifier(roots)
    try:
        check_transaction(verifier.verify(jws), POLICY, "signed_transaction")
    except DomainError as error:
        return error.reason
    return None


def test_every_vector_agrees_with_apples_library(pki: Pki) -> None:
    root_der = der(pki.root)
    disagreements = []
    for vector in vectors(pki):
        apple_accepts = apple_verdict(root_der, vector.jws)
        reason = coinstore_verdict([pki.root], vector.jws)
        if apple_accepts != (reason is None) or reason != vector.reason:
            disagreements.append(f"{vector.name}: apple accepts={apple_accepts}, coinstore={reason or 'accepts'}")
    assert not disagreements, "\n".join(disagreements)


def test_pem_and_der_roots_load(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "root.der").write_bytes(der(pki.root))
    (tmp_path / "roots.pem").write_bytes(
        make_pki().root.public_bytes(serialization.Encoding.PEM) + pki.root.public_bytes(serialization.Encoding.PEM)
    )
    for path in ("root.der", "roots.pem"):
        roots = load_root_certificates([tmp_path / path])
        assert coinstore_verdict(roots, sign(pki, transaction())) is None
    # Apple's library needs DER; PEM fails there (coinstore accepts both on purpose).
    assert not apple_verdict(pki.root.public_bytes(serialization.Encoding.PEM), sign(pki, transaction()))


def test_stricter_than_apple_critical_marker(pki: Pki) -> None:
    from services.storesim import apple as sim

    original = sim.LEAF_MARKER_OID
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "critical marker")]))
        .issuer_name(pki.intermediate.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.intermediate_key.public_key()), critical=False
        )
        .add_extension(x509.UnrecognizedExtension(original, b"\x05\x00"), critical=True)
        .sign(pki.intermediate_key, hashes.SHA256())
    )
    jws = JwsSigner(leaf_key, [leaf, pki.intermediate, pki.root]).sign(transaction())
    assert coinstore_verdict([pki.root], jws) is not None


def test_ca_without_key_usage_is_refused_like_strict_openssl(pki: Pki) -> None:
    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    intermediate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "lax intermediate")]))
        .issuer_name(pki.root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.root.public_key()), critical=False)  # type: ignore[arg-type]
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.840.113635.100.6.2.1"), b"\x05\x00"), critical=False
        )
        .sign(pki.root_key, hashes.SHA384())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(intermediate.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.840.113635.100.6.11.1"), b"\x05\x00"), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    jws = JwsSigner(leaf_key, [leaf, intermediate, pki.root]).sign(transaction())
    assert not apple_verdict(der(pki.root), jws)
    assert coinstore_verdict([pki.root], jws) == "UNTRUSTED_CHAIN"


def test_chain_cache_makes_steady_state_one_signature_check(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = AppleJwsVerifier([pki.root])
    calls: list[tuple[str, str]] = []
    original = verifier._verify_chain

    def counting(x5c: tuple[str, str], field: str) -> Any:
        calls.append(x5c)
        return original(x5c, field)

    monkeypatch.setattr(verifier, "_verify_chain", counting)
    for quantity in range(1, 6):
        assert verifier.verify(sign(pki, transaction(quantity=quantity)))["quantity"] == quantity
    assert len(calls) == 1
    # A cached chain still refuses a JWS signed outside its validity.
    late = int((datetime.now(UTC) + timedelta(days=4000)).timestamp() * 1000)
    with pytest.raises(DomainError) as caught:
        verifier.verify(sign(pki, transaction(signedDate=late)))
    assert caught.value.reason == "CERTIFICATE_EXPIRED"
