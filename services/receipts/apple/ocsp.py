"""Online revocation checks (OCSP) of Apple's signing chain, as Apple's library does.

A SHA-256 CertID request is POSTed to each OCSP URL of the certificate's
Authority Information Access. The response must be SUCCESSFUL, signed by the
issuer (or a responder the issuer delegated with the OCSPSigning EKU), and hold
a GOOD status for the certificate with ``thisUpdate ≤ now + 60 s`` and
``nextUpdate ≥ now − 60 s``. REVOKED or anything unverifiable →
INVALID_ARGUMENT ``CERTIFICATE_REVOKED``/``OCSP_INVALID``; network failures →
UNAVAILABLE ``OCSP_UNAVAILABLE`` (retrying is safe).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from services.common.errors import InvalidArgument, Unavailable
from services.receipts.apple.jws import OcspChecker

MAX_SKEW_SECONDS = 60.0
CACHE_SECONDS = 15 * 60.0


def _ocsp_urls(cert: x509.Certificate) -> list[str]:
    try:
        access = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return [
        d.access_location.value
        for d in access
        if d.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
    ]


def _verify_signed_by(response: ocsp.OCSPResponse, signer: x509.Certificate) -> bool:
    key = signer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or response.signature_hash_algorithm is None:
        return False
    try:
        key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(response.signature_hash_algorithm))
    except InvalidSignature:
        return False
    return True


def _responder_matches(response: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if response.responder_key_hash is not None:
        digest = hashes.Hash(hashes.SHA1())  # noqa: S303 (the OCSP responder key hash is SHA-1 by RFC 6960)
        digest.update(_public_key_bits(cert))
        return digest.finalize() == response.responder_key_hash
    return response.responder_name == cert.subject


def _public_key_bits(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING contents (what RFC 6960 key hashes cover)."""
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


class HttpOcspChecker(OcspChecker):
    def __init__(
        self, client: httpx.AsyncClient, timeout_seconds: float = 10.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._client = client
        self._timeout = timeout_seconds
        self._clock = clock

    async def check(self, cert: x509.Certificate, issuer: x509.Certificate, field: str) -> float:
        urls = _ocsp_urls(cert)
        if not urls:
            raise InvalidArgument(field, "a certificate of the chain names no OCSP responder", "OCSP_INVALID")
        request = (ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA256()).build()).public_bytes(
            serialization.Encoding.DER
        )
        for url in urls:
            try:
                reply = await self._client.post(
                    url,
                    content=request,
                    headers={"Content-Type": "application/ocsp-request"},
                    timeout=self._timeout,
                )
            except httpx.HTTPError:
                raise Unavailable("OCSP_UNAVAILABLE", "the OCSP responder is unreachable; retry later") from None
            if reply.status_code != 200:
                raise Unavailable("OCSP_UNAVAILABLE", f"the OCSP responder answered HTTP {reply.status_code}")
            try:
                response = ocsp.load_der_ocsp_response(reply.content)
            except ValueError:
                raise InvalidArgument(field, "the OCSP response cannot be parsed", "OCSP_INVALID") from None
            return self._evaluate(response, cert, issuer, field)
        raise AssertionError("unreachable")

    def _evaluate(
        self, response: ocsp.OCSPResponse, cert: x509.Certificate, issuer: x509.Certificate, field: str
    ) -> float:
        if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise Unavailable("OCSP_UNAVAILABLE", f"OCSP status {response.response_status.name}")
        signer: x509.Certificate | None = None
        for candidate in [issuer, *response.certificates]:
            if _responder_matches(response, candidate):
                signer = candidate
                break
        if signer is None:
            raise InvalidArgument(field, "the OCSP responder is unknown", "OCSP_INVALID")
        if signer is not issuer:
            try:
                signer.verify_directly_issued_by(issuer)
                usage = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
                raise InvalidArgument(field, "the OCSP responder is not delegated", "OCSP_INVALID") from None
            if ExtendedKeyUsageOID.OCSP_SIGNING not in usage:
                raise InvalidArgument(field, "the OCSP responder is not delegated", "OCSP_INVALID")
        if not _verify_signed_by(response, signer):
            raise InvalidArgument(field, "the OCSP response signature does not verify", "OCSP_INVALID")
        now = self._clock()
        for single in response.responses:
            if single.serial_number != cert.serial_number:
                continue
            if single.certificate_status == ocsp.OCSPCertStatus.REVOKED:
                raise InvalidArgument(field, "a certificate of the chain is revoked", "CERTIFICATE_REVOKED")
            if single.certificate_status != ocsp.OCSPCertStatus.GOOD:
                continue
            this_update = single.this_update_utc.timestamp()
            next_update = single.next_update_utc.timestamp() if single.next_update_utc else now + CACHE_SECONDS
            if this_update > now + MAX_SKEW_SECONDS or next_update < now - MAX_SKEW_SECONDS:
                continue
            return min(next_update, now + CACHE_SECONDS)
        raise InvalidArgument(field, "no current GOOD OCSP status for the certificate", "OCSP_INVALID")
