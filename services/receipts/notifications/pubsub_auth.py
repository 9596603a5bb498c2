"""Verification of the OIDC tokens Cloud Pub/Sub push requests carry.

RS256 only, against the JWKS at COINSTORE_PUBSUB_JWKS_URL (cached; refetched
when a token names an unknown key id, at most once per cooldown so a flood of
forged kids cannot hammer the key server). Claims: iss accounts.google.com,
aud, email, email_verified, exp and iat.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import jwt
from jwt.algorithms import RSAAlgorithm

GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")
# Pub/Sub tokens "may be up to one hour old"; a little skew on top.
_LEEWAY_SECONDS = 60
_MAX_AGE_SECONDS = 3600 + _LEEWAY_SECONDS


class TokenRejected(Exception):
    """The push request's token is missing, forged, expired or not for us."""


class KeysUnavailable(Exception):
    """The JWKS could not be fetched: the sender should retry later."""


Fetch = Callable[[str, float], bytes]


def _http_get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (URL from settings)
        return bytes(response.read())


@dataclass(eq=False)
class JwksCache:
    """Public keys by kid, refetched on an unknown kid or after ``max_age``."""

    url: str
    _: KW_ONLY
    timeout: float = 5.0
    max_age: float = 3600.0
    refresh_cooldown: float = 10.0
    fetch: Fetch = _http_get
    clock: Callable[[], float] = time.monotonic
    _keys: dict[str, Any] = field(default_factory=dict, init=False)
    _fetched_at: float | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def _refresh(self) -> None:
        try:
            document = json.loads(self.fetch(self.url, self.timeout))
            keys: dict[str, Any] = {}
            for entry in document.get("keys", []):
                if entry.get("kty") == "RSA" and entry.get("kid") and entry.get("use", "sig") == "sig":
                    keys[str(entry["kid"])] = RSAAlgorithm.from_jwk(entry)
        except Exception as exc:  # network, JSON or key errors: the keys are unavailable
            raise KeysUnavailable(f"cannot load the Pub/Sub JWKS: {exc}") from exc
        self._keys = keys
        self._fetched_at = self.clock()

    def key(self, kid: str) -> Any:
        with self._lock:
            now = self.clock()
            stale = self._fetched_at is None or now - self._fetched_at > self.max_age
            if stale or (kid not in self._keys and now - (self._fetched_at or 0.0) >= self.refresh_cooldown):
                self._refresh()
            try:
                return self._keys[kid]
            except KeyError:
                raise TokenRejected("unknown key id") from None


class PubSubTokenVerifier:
    def __init__(self, keys: JwksCache, audience: str, service_account: str) -> None:
        self._keys = keys
        self._audience = audience
        self._email = service_account

    def verify(self, authorization: str | None) -> Mapping[str, Any]:
        if not authorization or not authorization.startswith("Bearer "):
            raise TokenRejected("missing bearer token")
        token = authorization[len("Bearer ") :].strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"malformed token: {exc}") from None
        if header.get("alg") != "RS256":
            raise TokenRejected(f"algorithm {header.get('alg')!r} refused")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("token has no key id")
        key = self._keys.key(kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                audience=self._audience,
                issuer=list(GOOGLE_ISSUERS),
                leeway=_LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise TokenRejected(str(exc)) from None
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise TokenRejected("wrong issuer")
        iat = claims.get("iat")
        if not isinstance(iat, int | float) or time.time() - float(iat) > _MAX_AGE_SECONDS:
            raise TokenRejected("token too old")
        if claims.get("email") != self._email:
            raise TokenRejected("wrong service account")
        if claims.get("email_verified") is not True:
            raise TokenRejected("email not verified")
        return claims
