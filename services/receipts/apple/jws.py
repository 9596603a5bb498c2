"""Verification of Apple's JWS (StoreKit 2 transactions, server notifications).

The same algorithm as Apple's ``SignedDataVerifier`` with strict X.509 checks,
and stricter where noted:

1. compact JWS of three base64url parts; header and payload JSON objects;
2. ``alg`` exactly ``ES256`` (no ``none``, no HMAC); a ``crit`` header is refused;
3. ``x5c`` exactly three standard-base64 DER certificates; trust comes from the
   configured roots (``x5c[2]`` is not trusted, as in Apple's library);
4. intermediate directly issued by a configured root, leaf directly issued by
   the intermediate (issuer name, signature, key identifiers); CA basic
   constraints (critical, CA, path length) and key usage (keyCertSign) on the
   intermediate, CA false and digitalSignature on the leaf, unknown critical
   extensions refused; the leaf key must be P-256. Stricter than Apple: the two
   Apple marker extensions must be non-critical (as Apple's Java library requires);
5. leaf OID 1.2.840.113635.100.6.11.1, intermediate OID 1.2.840.113635.100.6.2.1;
6. every certificate valid at the effective date: the payload's ``signedDate``
   (or ``receiptCreationDate``) offline, now when online checks are on;
7. optionally OCSP for the intermediate and the leaf (cached until the response's
   nextUpdate, at most 15 minutes);
8. the ES256 signature over the signing input with the leaf key.

Checked headers are cached by their text and verified chains by their
certificate bytes, so the steady state is the payload's JSON decode, two
dictionary look-ups, a validity-window comparison and one ES256 verification.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import ExtensionOID

from services.common.errors import InvalidArgument
from services.common.loop import OnLoop
from services.common.settings import SettingsError

log = logging.getLogger(__name__)

LEAF_MARKER_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.11.1")
INTERMEDIATE_MARKER_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.2.1")
CACHE_SIZE = 64
MAX_JWS_LENGTH = 64 * 1024

# Extensions a certificate may mark critical that this verifier understands.
_KNOWN_CRITICAL = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.CERTIFICATE_POLICIES,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
}
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class RootCertificateError(SettingsError):
    """A configured root certificate file cannot be used (stops start-up)."""


def load_root_certificates(paths: Sequence[Path]) -> list[x509.Certificate]:
    """DER or PEM files (a PEM file may hold several certificates)."""
    roots: list[x509.Certificate] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RootCertificateError(f"COINSTORE_APPLE_ROOT_CERTS: cannot read {path}: {exc.strerror}") from None
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                roots.extend(x509.load_pem_x509_certificates(data))
            else:
                roots.append(x509.load_der_x509_certificate(data))
        except ValueError:
            raise RootCertificateError(
                f"COINSTORE_APPLE_ROOT_CERTS: {path} is not a DER or PEM X.509 certificate"
            ) from None
    if not roots:
        raise RootCertificateError("COINSTORE_APPLE_ROOT_CERTS: no root certificates configured")
    return roots


_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _b64url_bytes(part: bytes) -> bytes:
    return binascii.a2b_base64(part.translate(_URLSAFE) + b"=" * (-len(part) % 4), strict_mode=True)


def _b64url(part: str) -> bytes:
    return _b64url_bytes(part.encode("ascii"))


@dataclass(frozen=True)
class _Chain:
    """A verified leaf + intermediate (+ root), with what per-JWS checks still need."""

    x5c: tuple[str, str]
    key: ec.EllipticCurvePublicKey
    not_before: float
    not_after: float
    leaf: x509.Certificate
    intermediate: x509.Certificate
    root: x509.Certificate


class Decoded(NamedTuple):
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes
    chain: _Chain


class OcspChecker:
    """Revocation status of a (certificate, issuer) pair; see services.receipts.apple.ocsp."""

    async def check(self, cert: x509.Certificate, issuer: x509.Certificate, field: str) -> float:
        """Raise when revoked or unknown; return until when the answer may be cached (epoch seconds)."""
        raise NotImplementedError


class AppleJwsVerifier:
    """Verifies Apple-signed JWS against the configured roots."""

    def __init__(
        self,
        roots: Sequence[x509.Certificate],
        *,
        online_checks: bool = False,
        ocsp: OcspChecker | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not roots:
            raise RootCertificateError("COINSTORE_APPLE_ROOT_CERTS: no root certificates configured")
        self._roots = list(roots)
        self._online = online_checks
        self._ocsp = ocsp
        self._clock = clock
        self._chains: OrderedDict[tuple[str, str], _Chain] = OrderedDict()
        self._headers: OrderedDict[str, _Chain] = OrderedDict()
        # The header of the previous JWS and its chain: almost every JWS shares it.
        self._last: tuple[str, _Chain | None] = ("", None)
        self._ocsp_until: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        if online_checks and ocsp is None:
            raise ValueError("online checks need an OCSP checker")

    # --- public API ----------------------------------------------------------

    @property
    def online_checks(self) -> bool:
        """Whether verification also asks OCSP (then only :meth:`verify_async` works)."""
        return self._online

    def verify(self, jws: str, field: str = "signed_transaction") -> dict[str, Any]:
        """Verify offline and return the payload (with online checks on, use :meth:`verify_async`).

        Every refusal is an INVALID_ARGUMENT naming ``field`` with its own reason:
        MALFORMED_JWS, UNSUPPORTED_ALGORITHM, INVALID_CHAIN_LENGTH,
        INVALID_CERTIFICATE, UNTRUSTED_CHAIN, CERTIFICATE_EXPIRED,
        MISSING_APPLE_OID, INVALID_SIGNATURE.
        """
        if self._online:
            raise RuntimeError("online checks are on: use verify_async")
        return self._verify_offline(jws, field)[0]

    async def verify_async(self, jws: str, field: str = "signed_transaction") -> dict[str, Any]:
        """:meth:`verify`, then the OCSP checks of the chain when online checks are on."""
        payload, chain = self._verify_offline(jws, field)
        if self._online:
            assert self._ocsp is not None
            if self._ocsp_until.get(chain.x5c, 0.0) <= self._clock():
                until = min(
                    await self._ocsp.check(chain.intermediate, chain.root, field),
                    await self._ocsp.check(chain.leaf, chain.intermediate, field),
                )
                with self._lock:
                    self._ocsp_until[chain.x5c] = until
                    if len(self._ocsp_until) > CACHE_SIZE:
                        now = self._clock()
                        for key in [k for k, v in self._ocsp_until.items() if v <= now]:
                            del self._ocsp_until[key]
        return payload

    def verify_blocking(self, jws: str, field: str, loop: OnLoop) -> dict[str, Any]:
        """:meth:`verify_async` for a thread that waits: the offline checks run in it, and
        with online checks on, the whole verification runs on ``loop`` (the one that owns
        the OCSP client) while it waits."""
        if not self._online:
            return self._verify_offline(jws, field)[0]
        return loop.run(self.verify_async(jws, field))

    # --- steps -----------------------------------------------------------------

    def _verify_offline(self, jws: str, field: str) -> tuple[dict[str, Any], _Chain]:
        """Decode, chain, validity (at signedDate offline, now online) and the ES256
        signature: the one path both :meth:`verify` and :meth:`verify_async` take."""
        payload, signing_input, signature, chain = self.decode(jws, field)
        moment = self._effective_date(payload)
        if not chain.not_before <= moment <= chain.not_after:
            self._check_validity(chain, moment, field)
        if len(signature) != 64:
            raise InvalidArgument(field, "the ES256 signature is not 64 bytes", "INVALID_SIGNATURE")
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        try:
            chain.key.verify(der, signing_input, _ECDSA_SHA256)
        except InvalidSignature:
            raise InvalidArgument(field, "the JWS signature does not verify", "INVALID_SIGNATURE") from None
        return payload, chain

    def decode(self, jws: str, field: str) -> Decoded:
        """Split and decode the JWS and find its verified chain (cached by header text)."""
        if len(jws) > MAX_JWS_LENGTH:
            raise InvalidArgument(field, "the JWS is too long", "MALFORMED_JWS")
        first = jws.find(".")
        last = jws.rfind(".")
        # A third dot would sit inside the payload, which strict base64 decoding refuses.
        if first <= 0 or last == first:
            raise InvalidArgument(field, "not a compact JWS (three dot-separated parts)", "MALFORMED_JWS")
        last_header, last_chain = self._last
        if last_chain is not None and first == len(last_header) and jws.startswith(last_header):
            chain = last_chain
        else:
            header_part = jws[:first]
            found = self._headers.get(header_part)
            if found is None:
                found = self._chain(self._check_header(header_part, field), field)
                with self._lock:
                    self._headers[header_part] = found
                    while len(self._headers) > CACHE_SIZE:
                        self._headers.popitem(last=False)
            chain = found
            self._last = (header_part, chain)
        try:
            signing_input = jws[:last].encode("ascii")
            payload = orjson.loads(_b64url_bytes(signing_input[first + 1 :]))
            signature = _b64url(jws[last + 1 :])
        except (ValueError, binascii.Error):
            raise InvalidArgument(field, "the JWS payload is not base64url JSON", "MALFORMED_JWS") from None
        if not isinstance(payload, dict):
            raise InvalidArgument(field, "the JWS payload must be a JSON object", "MALFORMED_JWS")
        return Decoded(payload, signing_input, signature, chain)

    def _check_header(self, part: str, field: str) -> tuple[str, str]:
        """The header checks; the result depends only on the header text, so it is cached by it."""
        try:
            header = orjson.loads(_b64url(part))
        except (ValueError, binascii.Error):
            raise InvalidArgument(field, "the JWS header is not base64url JSON", "MALFORMED_JWS") from None
        if not isinstance(header, dict):
            raise InvalidArgument(field, "the JWS header must be a JSON object", "MALFORMED_JWS")
        if header.get("alg") != "ES256":
            raise InvalidArgument(field, f"alg {header.get('alg')!r} is not ES256", "UNSUPPORTED_ALGORITHM")
        if "crit" in header:
            raise InvalidArgument(field, "critical JWS header parameters are not supported", "MALFORMED_JWS")
        x5c = header.get("x5c")
        if not isinstance(x5c, list) or not all(isinstance(c, str) and c for c in x5c):
            raise InvalidArgument(field, "the JWS header has no x5c certificate chain", "INVALID_CHAIN_LENGTH")
        if len(x5c) != 3:
            raise InvalidArgument(field, f"x5c holds {len(x5c)} certificates, not 3", "INVALID_CHAIN_LENGTH")
        return (x5c[0], x5c[1])

    def _effective_date(self, payload: dict[str, Any]) -> float:
        signed = payload.get("signedDate")
        if signed is None:
            signed = payload.get("receiptCreationDate")
        if self._online or type(signed) is not int:
            return self._clock()
        return signed / 1000

    def _chain(self, key: tuple[str, str], field: str) -> _Chain:
        chain = self._chains.get(key)
        if chain is not None:
            return chain
        chain = self._verify_chain(key, field)
        with self._lock:
            self._chains[key] = chain
            while len(self._chains) > CACHE_SIZE:
                self._chains.popitem(last=False)
        return chain

    def _verify_chain(self, x5c: tuple[str, str], field: str) -> _Chain:
        try:
            leaf = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
            intermediate = x509.load_der_x509_certificate(base64.b64decode(x5c[1], validate=True))
        except (ValueError, binascii.Error):
            raise InvalidArgument(
                field, "x5c holds a certificate that cannot be parsed", "INVALID_CERTIFICATE"
            ) from None
        root = self._issuer_of(intermediate)
        if root is None:
            raise InvalidArgument(field, "the chain does not end at a trusted root", "UNTRUSTED_CHAIN")
        if not _issued_by(leaf, intermediate):
            raise InvalidArgument(field, "the leaf is not issued by the intermediate", "UNTRUSTED_CHAIN")
        problem = _ca_problem(intermediate, root) or _leaf_problem(leaf, intermediate)
        if problem:
            raise InvalidArgument(field, problem, "UNTRUSTED_CHAIN")
        if not _has_marker(leaf, LEAF_MARKER_OID) or not _has_marker(intermediate, INTERMEDIATE_MARKER_OID):
            raise InvalidArgument(field, "the chain lacks Apple's certificate markers", "MISSING_APPLE_OID")
        public_key = leaf.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        certificates = (leaf, intermediate, root)
        return _Chain(
            x5c,
            public_key,
            max(c.not_valid_before_utc.timestamp() for c in certificates),
            min(c.not_valid_after_utc.timestamp() for c in certificates),
            leaf,
            intermediate,
            root,
        )

    def _issuer_of(self, intermediate: x509.Certificate) -> x509.Certificate | None:
        for root in self._roots:
            if _issued_by(intermediate, root):
                return root
        return None

    def _check_validity(self, chain: _Chain, moment: float, field: str) -> None:
        if not chain.not_before <= moment <= chain.not_after:
            at = datetime.fromtimestamp(moment, UTC).isoformat()
            raise InvalidArgument(field, f"a certificate of the chain is not valid at {at}", "CERTIFICATE_EXPIRED")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Issuer name, signature and (when both present) key identifiers match."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return True
    return aki.key_identifier is None or aki.key_identifier == ski.digest


def _extension(cert: x509.Certificate, kind: type[Any]) -> x509.Extension[Any] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _unknown_critical(cert: x509.Certificate) -> bool:
    return any(
        ext.critical and ext.oid not in _KNOWN_CRITICAL and ext.oid not in (LEAF_MARKER_OID, INTERMEDIATE_MARKER_OID)
        for ext in cert.extensions
    )


def _ca_problem(ca: x509.Certificate, root: x509.Certificate) -> str | None:
    """What strict X.509 (RFC 5280 with OpenSSL's X509_STRICT) refuses in an intermediate CA."""
    constraints = _extension(ca, x509.BasicConstraints)
    if constraints is None or not constraints.critical or not constraints.value.ca:
        return "the intermediate is not a CA (critical basic constraints)"
    usage = _extension(ca, x509.KeyUsage)
    if usage is None or not usage.value.key_cert_sign:
        return "the intermediate may not sign certificates (key usage)"
    if _extension(ca, x509.SubjectKeyIdentifier) is None or _extension(ca, x509.AuthorityKeyIdentifier) is None:
        return "the intermediate lacks key identifiers"
    root_constraints = _extension(root, x509.BasicConstraints)
    if root_constraints is not None and (
        not root_constraints.value.ca
        or (root_constraints.value.path_length is not None and root_constraints.value.path_length < 1)
    ):
        return "the root may not issue this intermediate (basic constraints)"
    if _unknown_critical(ca):
        return "the intermediate has an unknown critical extension"
    return None


def _leaf_problem(leaf: x509.Certificate, intermediate: x509.Certificate) -> str | None:
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.value.ca:
        return "the signing certificate is a CA"
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and not usage.value.digital_signature:
        return "the signing certificate may not sign (key usage)"
    if _extension(leaf, x509.AuthorityKeyIdentifier) is None:
        return "the signing certificate lacks an authority key identifier"
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return "the signing certificate's key is not P-256 (ES256)"
    if _unknown_critical(leaf):
        return "the signing certificate has an unknown critical extension"
    return None


def _has_marker(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bool:
    try:
        extension = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return False
    return not extension.critical
