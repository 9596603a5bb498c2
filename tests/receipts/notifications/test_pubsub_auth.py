"""Pub/Sub push tokens: the simulator's real tokens and JWKS over HTTP; every
way a token can be wrong is refused."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from services.receipts.notifications.parse import Rejected, decode_pubsub_data
from services.receipts.notifications.pubsub_auth import JwksCache, PubSubTokenVerifier, TokenRejected
from tests.receipts.notifications.conftest import AUDIENCE, SERVICE_ACCOUNT, Sim


class _Verifier:
    """The verifier is blocking (it runs in the webhook's thread pool); run it off the loop serving the JWKS."""

    def __init__(self, sim: Sim) -> None:
        self.inner = PubSubTokenVerifier(JwksCache(sim.jwks_url, refresh_cooldown=0.0), AUDIENCE, SERVICE_ACCOUNT)

    async def verify(self, header: str | None) -> Mapping[str, Any]:
        return await asyncio.to_thread(self.inner.verify, header)


def _verifier(sim: Sim) -> _Verifier:
    return _Verifier(sim)


async def test_simulator_token_is_accepted(sim: Sim) -> None:
    claims = await _verifier(sim).verify(f"Bearer {sim.push.token()}")
    assert claims["email"] == SERVICE_ACCOUNT
    bare = await _verifier(sim).verify(f"Bearer {sim.push.token(iss='accounts.google.com')}")
    assert bare["iss"] == "accounts.google.com"


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"aud": "https://someone-else.example/push"}, "audience"),
        ({"iss": "https://evil.example.com"}, "issuer"),
        ({"email": "attacker@evil.iam.gserviceaccount.com"}, "service account"),
        ({"email_verified": False}, "verified"),
        ({"exp": int(time.time()) - 600, "iat": int(time.time()) - 4200}, "expired"),
        ({"iat": int(time.time()) - 3 * 3600, "exp": int(time.time()) + 600}, "too old"),
        ({"exp": None}, "exp"),
        ({"iat": None}, "iat"),
    ],
)
async def test_wrong_claims_are_refused(sim: Sim, overrides: dict[str, object], why: str) -> None:
    with pytest.raises(TokenRejected):
        await _verifier(sim).verify(f"Bearer {sim.push.token(**overrides)}")


async def test_unknown_key_is_refused(sim: Sim) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = jwt.decode(sim.push.token(), options={"verify_signature": False})
    forged_own_kid = jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": "not-a-google-key"})
    with pytest.raises(TokenRejected, match="unknown key"):
        await _verifier(sim).verify(f"Bearer {forged_own_kid}")
    # A forged signature under Google's real kid fails the signature check.
    forged_real_kid = jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": sim.push.kid})
    with pytest.raises(TokenRejected, match="Signature"):
        await _verifier(sim).verify(f"Bearer {forged_real_kid}")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _token(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


async def test_hs256_and_none_are_refused(sim: Sim) -> None:
    claims = jwt.decode(sim.push.token(), options={"verify_signature": False})
    # HS256 keyed with the public JWK (the classic algorithm-confusion attack).
    secret = json.dumps(sim.push.jwks()["keys"][0]).encode()
    hs = _token({"alg": "HS256", "typ": "JWT", "kid": sim.push.kid}, claims, secret)
    unsigned = _token({"alg": "none", "kid": sim.push.kid}, claims, None)
    for token in (hs, unsigned):
        with pytest.raises(TokenRejected, match="algorithm"):
            await _verifier(sim).verify(f"Bearer {token}")


async def test_missing_or_garbage_token_is_refused(sim: Sim) -> None:
    for header in (None, "", "Basic abc", "Bearer not.a.jwt", "Bearer "):
        with pytest.raises(TokenRejected):
            await _verifier(sim).verify(header)


async def test_key_rotation_refreshes_the_cache(sim: Sim) -> None:
    verifier = _verifier(sim)
    await verifier.verify(f"Bearer {sim.push.token()}")
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sim.push.key = new_key
    sim.push.kid = "rotated-key-2"
    # The cached JWKS lacks the new kid: the verifier refetches and accepts.
    assert (await verifier.verify(f"Bearer {sim.push.token()}"))["aud"] == AUDIENCE


@pytest.mark.parametrize("urlsafe", [False, True])
def test_data_decoding_tolerates_both_alphabets_and_missing_padding(urlsafe: bool) -> None:
    raw = bytes(range(256)) + b'{"packageName":"x"}?>'
    encoded = base64.urlsafe_b64encode(raw).decode().rstrip("=") if urlsafe else base64.b64encode(raw).decode()
    assert decode_pubsub_data(encoded) == raw


def test_data_decoding_refuses_garbage() -> None:
    with pytest.raises(Rejected):
        decode_pubsub_data("not base64 at all!!")
