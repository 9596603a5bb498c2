"""Online checks: OCSP for the intermediate and the leaf against a loopback
responder over real HTTP, cached; revoked, unreachable and missing responders."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from services.common.errors import DomainError
from services.receipts.apple.jws import AppleJwsVerifier
from services.receipts.apple.ocsp import HttpOcspChecker
from services.storesim.apple import JwsSigner, Pki, make_pki


@dataclass
class Responder:
    issuers: dict[int, tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]] = field(
        default_factory=dict
    )
    revoked: set[int] = field(default_factory=set)
    requests: list[int] = field(default_factory=list)
    failing: bool = False

    async def handle(self, request: web.Request) -> web.Response:
        if self.failing:
            return web.Response(status=503)
        parsed = ocsp.load_der_ocsp_request(await request.read())
        self.requests.append(parsed.serial_number)
        cert, issuer, issuer_key = self.issuers[parsed.serial_number]
        now = datetime.now(UTC)
        revoked = parsed.serial_number in self.revoked
        response = (
            ocsp.OCSPResponseBuilder()
            .add_response(
                cert=cert,
                issuer=issuer,
                algorithm=hashes.SHA256(),
                cert_status=ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD,
                this_update=now - timedelta(minutes=1),
                next_update=now + timedelta(hours=12),
                revocation_time=now - timedelta(hours=1) if revoked else None,
                revocation_reason=None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer)
            .sign(issuer_key, hashes.SHA256())
        )
        return web.Response(
            body=response.public_bytes(serialization.Encoding.DER), content_type="application/ocsp-response"
        )


@pytest.fixture
async def responder() -> AsyncIterator[tuple[Responder, str]]:
    state = Responder()
    app = web.Application()
    app.router.add_post("/ocsp", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield state, f"http://127.0.0.1:{port}/ocsp"
    finally:
        await runner.cleanup()


def chain_with_ocsp(responder: Responder, url: str) -> Pki:
    pki = make_pki(ocsp_url=url)
    responder.issuers[pki.intermediate.serial_number] = (pki.intermediate, pki.root, pki.root_key)
    responder.issuers[pki.leaf.serial_number] = (pki.leaf, pki.intermediate, pki.intermediate_key)
    return pki


def payload() -> dict[str, Any]:
    return {"transactionId": "1", "bundleId": "com.coinstore.app", "signedDate": int(time.time() * 1000)}


async def test_good_status_verified_then_cached(responder: tuple[Responder, str]) -> None:
    state, url = responder
    pki = chain_with_ocsp(state, url)
    async with httpx.AsyncClient() as client:
        verifier = AppleJwsVerifier([pki.root], online_checks=True, ocsp=HttpOcspChecker(client, 5.0))
        jws = JwsSigner(pki.leaf_key, pki.chain).sign(payload())
        assert (await verifier.verify_async(jws))["transactionId"] == "1"
        assert state.requests == [pki.intermediate.serial_number, pki.leaf.serial_number]
        await verifier.verify_async(JwsSigner(pki.leaf_key, pki.chain).sign(payload()))
        assert len(state.requests) == 2, "the OCSP answers are cached"


async def test_revoked_leaf_refused(responder: tuple[Responder, str]) -> None:
    state, url = responder
    pki = chain_with_ocsp(state, url)
    state.revoked.add(pki.leaf.serial_number)
    async with httpx.AsyncClient() as client:
        verifier = AppleJwsVerifier([pki.root], online_checks=True, ocsp=HttpOcspChecker(client, 5.0))
        with pytest.raises(DomainError) as caught:
            await verifier.verify_async(JwsSigner(pki.leaf_key, pki.chain).sign(payload()))
    assert (caught.value.code.name, caught.value.reason) == ("INVALID_ARGUMENT", "CERTIFICATE_REVOKED")


async def test_unreachable_responder_is_retryable(responder: tuple[Responder, str]) -> None:
    state, url = responder
    pki = chain_with_ocsp(state, url)
    state.failing = True
    async with httpx.AsyncClient() as client:
        verifier = AppleJwsVerifier([pki.root], online_checks=True, ocsp=HttpOcspChecker(client, 5.0))
        with pytest.raises(DomainError) as caught:
            await verifier.verify_async(JwsSigner(pki.leaf_key, pki.chain).sign(payload()))
        assert (caught.value.code.name, caught.value.reason) == ("UNAVAILABLE", "OCSP_UNAVAILABLE")
        no_aia = make_pki()
        verifier = AppleJwsVerifier([no_aia.root], online_checks=True, ocsp=HttpOcspChecker(client, 5.0))
        with pytest.raises(DomainError) as caught:
            await verifier.verify_async(JwsSigner(no_aia.leaf_key, no_aia.chain).sign(payload()))
        assert caught.value.reason == "OCSP_INVALID"
