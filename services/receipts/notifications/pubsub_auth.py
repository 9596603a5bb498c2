"""Verification of the OIDC tokens Cloud Pub/Sub push requests carry.

RS256 only, against the JWKS at COINSTORE_PUBSUB_JWKS_URL (cached; refetched
when a token names an unknown key id, at most once per cooldown so a flood of
forged kids cannot hammer the key server). A failed fetch is not retried before
``failure_cooldown``; meanwhile the keys already held keep verifying, and a token
whose key is not among them is answered "unavailable" (503: Pub/Sub retries),
since the key may be new. Claims: iss accounts.google.com, aud, email,
email_verified, exp and iat.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import jwt
from jwt.algorithms import RSAAlgorithm

from services.common.outbound import OutboundPolicy

log = logging.getLogger(__name__)

GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")
# Pub/Sub tokens "may be up to one hour old"; a little skew on top.
_LEEWAY_SECONDS = 60
_MAX_AGE_SECONDS = 3600 + _LEEWAY_SECONDS


class TokenRejected(Exception):
    """The push request's token is missing, forged, expired or not for us."""


class KeysUnavailable(Exception):
    """The JWKS could not be fetched: the sender should retry later."""


Fetch = Callable[[str, float], bytes]


@dataclass(eq=False)
class JwksCache:
    """Public keys by kid, refetched on an unknown kid or after ``max_age``."""

    url: str
    _: KW_ONLY
    timeout: float = 5.0
    max_age: float = 3600.0
    refresh_cooldown: float = 10.0
    failure_cooldown: float = 30.0
    fetch: Fetch = field(default_factory=lambda: OutboundPolicy().get)
    clock: Callable[[], float] = time.monotonic
    _keys: dict[str, Any] = field(default_factory=dict, init=False)
    _fetched_at: float | None = field(default=None, init=False)
    _failed_at: float | None = field(default=None, init=False)
    _failure: str = field(default="", init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def _refresh(self, now: float) -> bool:
        """Fetch the keys; False (and the failure remembered) when that fails."""
        try:
            document = json.loads(self.fetch(self.url, self.timeout))
            keys: dict[str, Any] = {}
            for entry in document.get("keys", []):
                if entry.get("kty") == "RSA" and entry.get("kid") and entry.get("use", "sig") == "sig":
                    keys[str(entry["kid"])] = RSAAlgorithm.from_jwk(entry)
        except Exception as exc:  # network, JSON or key errors: keep what we hold
            self._failed_at, self._failure = now, f"{type(exc).__name__}: {exc}"
            log.warning("cannot load the Pub/Sub JWKS (next try in %gs): %s", self.failure_cooldown, self._failure)
            return False
        self._keys, self._fetched_at, self._failed_at = keys, now, None
        return True

    def key(self, kid: str) -> Any:
        with self._lock:
            now = self.clock()
            cooling = self._failed_at is not None and now - self._failed_at < self.failure_cooldown
            stale = self._fetched_at is None or now - self._fetched_at > self.max_age
            unknown = kid not in self._keys and now - (self._fetched_at or 0.0) >= self.refresh_cooldown
            fresh = True
            if cooling:
                fresh = False
            elif stale or unknown:
                fresh = self._refresh(now)
            if kid in self._keys:
                return self._keys[kid]
            if not fresh:
                raise KeysUnavailable(f"cannot load the Pub/Sub JWKS: {self._failure}")
            raise TokenRejected("unknown key id")


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
