"""Caller authentication: ES256 bearer JWTs with audience ``coinstore`` and space-separated scopes.

Services trust the keys of a key policy (``COINSTORE_AUTH_KEY_POLICY``): each key may
sign only for its subjects, grant only its scopes, assert ``act`` (acting for someone)
only if allowed, and only tokens with a ``kid``, an ``iat`` and a bounded lifetime.
Without a policy (development), the keys of ``COINSTORE_AUTH_TRUSTED_KEYS`` are
trusted unrestricted, as before. A process that calls another service signs its own
short-lived token with ``COINSTORE_AUTH_SIGNING_KEY`` (see :class:`TokenSource`).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import tomllib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.descriptor import FileDescriptor

from coinstore.auth.v1 import auth_pb2
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.settings import SettingsError

log = logging.getLogger(__name__)

AUDIENCE = "coinstore"
ALGORITHM = "ES256"
LEEWAY_SECONDS = 30
_CACHE_SIZE = 4096

# Every scope a token may carry; an RPC's required scope must be one of these.
SCOPES = frozenset(
    {
        "purchases:verify",
        "purchases:consent",
        "wallet:read",
        "wallet:purchases",
        "wallet:gift",
        "wallet:limits",
        "wallet:credit",
        "wallet:reserve",
        "payouts:request",
        "payouts:ops",
    }
)


@dataclass(frozen=True)
class Caller:
    """Who a verified token says is calling: its subject, scopes and signing key, and the
    person or end user it acts for (the ``act`` claim), for the ledger's records."""

    subject: str
    scopes: frozenset[str]
    expires_at: float
    kid: str = ""
    acting_for: str = ""


@dataclass(frozen=True)
class TrustedKey:
    """A public key callers sign with, and what tokens signed by it may assert.

    Without a key policy (development) a key is unnamed and unrestricted, as before;
    with one, every token names its key (``kid``) and stays within that key's subjects,
    scopes, ``act`` permission and lifetime."""

    key: ec.EllipticCurvePublicKey
    kid: str = ""
    subjects: frozenset[str] | None = None
    scopes: frozenset[str] | None = None
    may_act: bool = True
    max_lifetime_seconds: int | None = None


@dataclass(frozen=True)
class KeyRing:
    keys: tuple[TrustedKey, ...]

    @property
    def named(self) -> bool:
        """With a key policy every token must carry a kid, iat and a bounded lifetime."""
        return any(k.kid for k in self.keys)

    def by_kid(self, kid: str) -> TrustedKey | None:
        return next((k for k in self.keys if k.kid and k.kid == kid), None)


def _read_public_key(path: Path, setting: str) -> ec.EllipticCurvePublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SettingsError(
            f"{setting}: cannot read {path}: {exc.strerror}"
            " (run `coinstore auth keygen` or `make run` once to create the dev key)"
        ) from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SettingsError(f"{setting}: {path} is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SettingsError(f"{setting}: {path} is not a P-256 key (ES256)")
    return key


def load_public_keys(paths: Sequence[Path]) -> list[ec.EllipticCurvePublicKey]:
    keys = [_read_public_key(path, "COINSTORE_AUTH_TRUSTED_KEYS") for path in paths]
    if not keys:
        raise SettingsError("COINSTORE_AUTH_TRUSTED_KEYS: no keys configured")
    return keys


def load_key_policy(path: Path) -> KeyRing:
    """The key policy file (TOML): one [[keys]] table per trusted key.

    ``kid``, ``public_key`` (path), ``subjects`` and ``scopes`` (lists), ``may_act``
    (may assert ``act``, default false) and ``max_lifetime_seconds`` (default 3600).
    Two keys for one caller can be trusted at once, which is how a key is rotated."""
    setting = "COINSTORE_AUTH_KEY_POLICY"
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SettingsError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{setting}: {path} is not TOML: {exc}") from None
    entries = raw.get("keys")
    if not isinstance(entries, list) or not entries:
        raise SettingsError(f"{setting}: {path} lists no [[keys]]")
    keys: list[TrustedKey] = []
    for index, entry in enumerate(entries):
        where = f"{setting}: {path} keys[{index}]"
        kid, public_key = entry.get("kid"), entry.get("public_key")
        subjects, scopes = entry.get("subjects"), entry.get("scopes")
        lifetime = entry.get("max_lifetime_seconds", 3600)
        if not isinstance(kid, str) or not kid or any(k.kid == kid for k in keys):
            raise SettingsError(f"{where}: kid must be a unique non-empty string")
        if not isinstance(public_key, str) or not public_key:
            raise SettingsError(f"{where}: public_key must be the path of a PEM public key")
        if not isinstance(subjects, list) or not subjects or not all(isinstance(x, str) and x for x in subjects):
            raise SettingsError(f"{where}: subjects must list the subjects the key may assert")
        if not isinstance(scopes, list) or not all(isinstance(x, str) for x in scopes) or set(scopes) - SCOPES:
            raise SettingsError(f"{where}: scopes must be a list of {', '.join(sorted(SCOPES))}")
        if not isinstance(lifetime, int) or isinstance(lifetime, bool) or not 60 <= lifetime <= 86_400:
            raise SettingsError(f"{where}: max_lifetime_seconds must be between 60 and 86400")
        relative = Path(public_key)
        key_path = relative if relative.is_absolute() else path.parent / relative
        keys.append(
            TrustedKey(
                _read_public_key(key_path, where),
                kid,
                frozenset(subjects),
                frozenset(scopes),
                bool(entry.get("may_act", False)),
                lifetime,
            )
        )
    return KeyRing(tuple(keys))


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"COINSTORE_AUTH_SIGNING_KEY: cannot read {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SettingsError(f"COINSTORE_AUTH_SIGNING_KEY: {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SettingsError(f"COINSTORE_AUTH_SIGNING_KEY: {path} is not a P-256 key (ES256)")
    return key


def generate_keypair(private_path: Path, public_path: Path) -> bool:
    """Create a P-256 key pair unless one exists; returns True when created."""
    if private_path.exists() and public_path.exists():
        return False
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    private_path.chmod(0o600)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return True


def mint_token(
    key: ec.EllipticCurvePrivateKey,
    subject: str,
    scopes: Iterable[str],
    ttl_seconds: int = 3600,
    now: float | None = None,
    *,
    kid: str = "",
    act: str = "",
) -> str:
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {
        "aud": AUDIENCE,
        "sub": subject,
        "scope": " ".join(sorted(set(scopes))),
        "iat": issued,
        "exp": issued + ttl_seconds,
    }
    if act:
        claims["act"] = {"sub": act}
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid} if kid else None)


class TokenVerifier:
    """Verifies bearer tokens against the trusted keys and their policies.

    A token that verified once is remembered (by its exact text) until it expires, so
    a caller that reuses its token costs one dictionary look-up. Callers learn only
    generic reasons for an unauthenticated call; the detail goes to the log.
    """

    def __init__(self, keys: Sequence[ec.EllipticCurvePublicKey] | KeyRing) -> None:
        self._ring = keys if isinstance(keys, KeyRing) else KeyRing(tuple(TrustedKey(k) for k in keys))
        self._cache: OrderedDict[str, Caller] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, authorization: str | None) -> Caller:
        if not authorization:
            raise Unauthenticated("MISSING_CREDENTIALS", "authorization metadata with a Bearer token is required")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("INVALID_CREDENTIALS", "authorization must be 'Bearer <token>'")
        token = token.strip()
        now = time.time()
        with self._lock:
            cached = self._cache.get(token)
            if cached is not None:
                if cached.expires_at + LEEWAY_SECONDS > now:
                    self._cache.move_to_end(token)
                    return cached
                del self._cache[token]
        try:
            caller = self._verify_uncached(token)
        except _Rejected as rejected:
            log.info("bearer token refused: %s", rejected.detail)
            raise Unauthenticated(rejected.reason, _GENERIC[rejected.reason]) from None
        with self._lock:
            self._cache[token] = caller
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return caller

    def _verify_uncached(self, token: str) -> Caller:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _Rejected("INVALID_CREDENTIALS", "not a JWT") from None
        if header.get("alg") != ALGORITHM:
            raise _Rejected("INVALID_CREDENTIALS", f"alg {header.get('alg')!r}, not ES256")
        kid = header.get("kid") or ""
        if not isinstance(kid, str):
            raise _Rejected("INVALID_CREDENTIALS", "kid is not a string")
        if self._ring.named:
            trusted = self._ring.by_kid(kid)
            if trusted is None:
                raise _Rejected("INVALID_CREDENTIALS", f"kid {kid!r} names no trusted key" if kid else "no kid")
            candidates: tuple[TrustedKey, ...] = (trusted,)
        else:
            candidates = self._ring.keys
        required = ["exp", "sub", "aud", "iat"] if self._ring.named else ["exp", "sub", "aud"]
        for candidate in candidates:
            try:
                claims = jwt.decode(
                    token,
                    candidate.key,
                    algorithms=[ALGORITHM],
                    audience=AUDIENCE,
                    leeway=LEEWAY_SECONDS,
                    options={"require": required},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise _Rejected("TOKEN_EXPIRED", "expired") from None
            except jwt.PyJWTError as exc:
                raise _Rejected("INVALID_CREDENTIALS", str(exc)) from None
            return _caller(claims, candidate, kid)
        raise _Rejected("INVALID_CREDENTIALS", "signature does not match a trusted key")


_GENERIC = {
    "INVALID_CREDENTIALS": "the bearer token is not valid",
    "TOKEN_EXPIRED": "the bearer token has expired",
}


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _caller(claims: dict[str, object], key: TrustedKey, kid: str) -> Caller:
    subject, scope, act = claims["sub"], claims.get("scope", ""), claims.get("act")
    if not isinstance(scope, str) or not isinstance(subject, str) or not subject:
        raise _Rejected("INVALID_CREDENTIALS", "claims are malformed")
    if isinstance(act, dict):
        act = act.get("sub")
    if act is not None and (not isinstance(act, str) or not act or len(act) > 256):
        raise _Rejected("INVALID_CREDENTIALS", "act must name who the caller acts for")
    scopes = frozenset(scope.split())
    expires_at, issued_at = float(claims["exp"]), float(claims.get("iat", 0) or 0)  # type: ignore[arg-type]
    if key.max_lifetime_seconds is not None and expires_at - issued_at > key.max_lifetime_seconds:
        raise _Rejected(
            "INVALID_CREDENTIALS",
            f"lives {expires_at - issued_at:.0f} s, key {kid} allows {key.max_lifetime_seconds} s",
        )
    # Authenticated, but asking for more than its key may grant: refused naming the key.
    if key.subjects is not None and subject not in key.subjects:
        raise PermissionDenied("KEY_SUBJECT_NOT_ALLOWED", f"key {kid} may not sign for {subject!r}", {"kid": kid})
    if key.scopes is not None and not scopes <= key.scopes:
        extra = " ".join(sorted(scopes - key.scopes))
        raise PermissionDenied(
            "KEY_SCOPE_NOT_ALLOWED", f"key {kid} may not grant {extra}", {"kid": kid, "scope": extra}
        )
    if act and not key.may_act:
        raise PermissionDenied("KEY_ACT_NOT_ALLOWED", f"key {kid} may not act for others", {"kid": kid})
    return Caller(subject, scopes, expires_at, kid, act or "")


def authorize(caller: Caller, required_scope: str) -> None:
    if required_scope not in caller.scopes:
        raise PermissionDenied(
            "MISSING_SCOPE",
            f"caller lacks scope {required_scope}",
            {"required_scope": required_scope, "subject": caller.subject},
        )


def required_scopes(files: Iterable[FileDescriptor]) -> dict[str, str]:
    """Map '/package.Service/Method' to the scope its proto declares.

    Raises ValueError for an RPC without a scope, so no RPC can ship unprotected.
    """
    scopes: dict[str, str] = {}
    for file in files:
        for service in file.services_by_name.values():
            for method in service.methods:
                scope = method.GetOptions().Extensions[auth_pb2.required_scope]
                if scope not in SCOPES:
                    raise ValueError(f"{service.full_name}/{method.name} declares no known required_scope")
                scopes[f"/{service.full_name}/{method.name}"] = scope
    return scopes


class TokenSource:
    """This process's own bearer token for calls to other services, renewed before it expires."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        subject: str,
        scopes: Iterable[str],
        ttl_seconds: int = 900,
        kid: str = "",
    ) -> None:
        self._key = key
        self._subject = subject
        self._scopes = tuple(scopes)
        self._ttl = ttl_seconds
        self._kid = kid
        self._token = ""
        self._renew_at = 0.0
        self._lock = threading.Lock()

    def header(self) -> str:
        now = time.time()
        with self._lock:
            if now >= self._renew_at:
                self._token = mint_token(self._key, self._subject, self._scopes, self._ttl, now, kid=self._kid)
                self._renew_at = now + self._ttl / 2
            return f"Bearer {self._token}"


def current_caller() -> Caller | None:
    """The caller of the RPC being served (set by the interceptor), for the records of who moved value."""
    return caller_var.get()


caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)
