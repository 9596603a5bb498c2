"""Minimal stand-ins for the receipts core's pieces this area needs, used until
the App Store / Google Play work lands its own (the Apple JWS verifier, the
App Store Server API client, the Play client and the crediting path).

Each class implements a port from ``ports.py``; `wiring.py` is the one place
that picks them, so replacing a shim with the core's adapter is a one-line
change there.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from services.receipts.notifications.ports import StoreUnavailable, VerificationFailed

_DER = Encoding.DER
_APPLE_LEAF_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.11.1")
_APPLE_INTERMEDIATE_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.2.1")


def load_roots(paths: Sequence[Path]) -> list[x509.Certificate]:
    roots = []
    for path in paths:
        data = path.read_bytes()
        roots.append(
            x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
        )
    return roots


class X5cJwsVerifier:
    """Apple's SignedDataVerifier algorithm without OCSP: a three-certificate x5c
    chain ending at a trusted root, Apple's marker OIDs, validity at signedDate,
    then the ES256 signature with the leaf key."""

    def __init__(self, roots: Sequence[x509.Certificate]) -> None:
        self._roots = {root.public_bytes(_DER): root for root in roots}

    def verify(self, jws: str) -> Mapping[str, Any]:
        try:
            header = jwt.get_unverified_header(jws)
        except jwt.PyJWTError as exc:
            raise VerificationFailed(f"malformed JWS: {exc}") from None
        if header.get("alg") != "ES256":
            raise VerificationFailed("algorithm must be ES256")
        chain = header.get("x5c")
        if not isinstance(chain, list) or len(chain) != 3:
            raise VerificationFailed("x5c must hold three certificates")
        try:
            leaf, intermediate, root = (x509.load_der_x509_certificate(base64.b64decode(c)) for c in chain)
        except (ValueError, TypeError):
            raise VerificationFailed("x5c certificate unreadable") from None
        trusted = self._roots.get(root.public_bytes(_DER))
        if trusted is None:
            raise VerificationFailed("chain does not end at a trusted root")
        try:
            leaf.verify_directly_issued_by(intermediate)
            intermediate.verify_directly_issued_by(trusted)
        except (ValueError, TypeError, InvalidSignature):
            raise VerificationFailed("certificate chain does not verify") from None
        for cert, oid in ((leaf, _APPLE_LEAF_OID), (intermediate, _APPLE_INTERMEDIATE_OID)):
            try:
                cert.extensions.get_extension_for_oid(oid)
            except x509.ExtensionNotFound:
                raise VerificationFailed("certificate lacks Apple's marker extension") from None
        public_key = leaf.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise VerificationFailed("leaf key is not EC")
        try:
            payload: dict[str, Any] = jwt.decode(jws, public_key, algorithms=["ES256"], options={"verify_aud": False})
        except jwt.PyJWTError as exc:
            raise VerificationFailed(f"signature: {exc}") from None
        signed = payload.get("signedDate")
        moment = datetime.fromtimestamp(signed / 1000, UTC) if isinstance(signed, int) else datetime.now(UTC)
        for cert in (leaf, intermediate, trusted):
            if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
                raise VerificationFailed("certificate not valid at signedDate")
        return payload


class AppStoreServerApi:
    """The two App Store Server API calls notifications need."""

    def __init__(
        self,
        *,
        production_url: str,
        sandbox_url: str,
        key_file: Path,
        key_id: str,
        issuer_id: str,
        bundle_id: str,
        timeout: float,
    ) -> None:
        self._urls = {"Production": production_url.rstrip("/"), "Sandbox": sandbox_url.rstrip("/")}
        key = load_pem_private_key(key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._key = key
        self._key_id = key_id
        self._issuer = issuer_id
        self._bundle = bundle_id
        self._http = httpx.Client(timeout=timeout)

    def _token(self) -> str:
        now = int(time.time())
        claims = {"iss": self._issuer, "iat": now, "exp": now + 300, "aud": "appstoreconnect-v1", "bid": self._bundle}
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._key_id, "typ": "JWT"})

    def _call(self, method: str, environment: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(
                method,
                self._urls.get(environment, self._urls["Production"]) + path,
                headers={"Authorization": f"Bearer {self._token()}", "Accept": "application/json"},
                **kwargs,
            )
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"App Store Server API: {exc}") from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise StoreUnavailable(f"App Store Server API answered {response.status_code}")
        response.raise_for_status()
        return response

    def send_consumption_information(self, transaction_id: str, environment: str, body: Mapping[str, Any]) -> None:
        self._call("PUT", environment, f"/inApps/v2/transactions/consumption/{transaction_id}", json=dict(body))

    def get_refund_history(self, transaction_id: str, environment: str, revision: str | None) -> Mapping[str, Any]:
        params = {"revision": revision} if revision else {}
        result: Mapping[str, Any] = self._call(
            "GET", environment, f"/inApps/v2/refund/lookup/{transaction_id}", params=params
        ).json()
        return result


class DeliveredFacts:
    """Coins are delivered the moment they are credited; how many were spent is
    the wallet's to say, so this stand-in reports DELIVERED with 0 % consumed."""

    def consumption(self, store_transaction_id: str) -> tuple[str, int]:
        return "DELIVERED", 0
