"""Caller authentication: ES256 bearer JWTs with audience ``coinstore`` and space-separated scopes.

Services trust the public keys listed in ``COINSTORE_AUTH_TRUSTED_KEYS``. A process
that calls another service signs its own short-lived token with
``COINSTORE_AUTH_SIGNING_KEY`` (see :class:`TokenSource`).
"""

from __future__ import annotations

import threading
import time
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

AUDIENCE = "coinstore"
ALGORITHM = "ES256"
LEEWAY_SECONDS = 30
_CACHE_SIZE = 4096

# Every scope a token may carry; an RPC's required scope must be one of these.
SCOPES = frozenset(
    {
        "purchases:verify",
        "wallet:read",
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
    subject: str
    scopes: frozenset[str]
    expires_at: float


def load_public_keys(paths: Sequence[Path]) -> list[ec.EllipticCurvePublicKey]:
    keys: list[ec.EllipticCurvePublicKey] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SettingsError(
                f"COINSTORE_AUTH_TRUSTED_KEYS: cannot read {path}: {exc.strerror}"
                " (run `coinstore auth keygen` or `make run` once to create the dev key)"
            ) from None
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise SettingsError(f"COINSTORE_AUTH_TRUSTED_KEYS: {path} is not a PEM public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise SettingsError(f"COINSTORE_AUTH_TRUSTED_KEYS: {path} is not a P-256 key (ES256)")
        keys.append(key)
    if not keys:
        raise SettingsError("COINSTORE_AUTH_TRUSTED_KEYS: no keys configured")
    return keys


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
) -> str:
    issued = int(time.time() if now is None else now)
    claims = {
        "aud": AUDIENCE,
        "sub": subject,
        "scope": " ".join(sorted(set(scopes))),
        "iat": issued,
        "exp": issued + ttl_seconds,
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


class TokenVerifier:
    """Verifies bearer tokens against the trusted keys.

    A token that verified once is remembered (by its exact text) until it
    expires, so a caller that reuses its token costs one dictionary look-up.
    """

    def __init__(self, keys: Sequence[ec.EllipticCurvePublicKey]) -> None:
        self._keys = list(keys)
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
        caller = self._verify_uncached(token)
        with self._lock:
            self._cache[token] = caller
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return caller

    def _verify_uncached(self, token: str) -> Caller:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("INVALID_CREDENTIALS", "bearer token is not a JWT") from None
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated("INVALID_CREDENTIALS", "bearer token must be signed with ES256")
        last_error = "signature does not match a trusted key"
        for key in self._keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[ALGORITHM],
                    audience=AUDIENCE,
                    leeway=LEEWAY_SECONDS,
                    options={"require": ["exp", "sub", "aud"]},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise Unauthenticated("TOKEN_EXPIRED", "bearer token has expired") from None
            except jwt.PyJWTError as exc:
                last_error = str(exc)
                break
            scope = claims.get("scope", "")
            if not isinstance(scope, str) or not isinstance(claims["sub"], str) or not claims["sub"]:
                raise Unauthenticated("INVALID_CREDENTIALS", "bearer token claims are malformed")
            return Caller(claims["sub"], frozenset(scope.split()), float(claims["exp"]))
        raise Unauthenticated("INVALID_CREDENTIALS", f"bearer token rejected: {last_error}")


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
        self, key: ec.EllipticCurvePrivateKey, subject: str, scopes: Iterable[str], ttl_seconds: int = 900
    ) -> None:
        self._key = key
        self._subject = subject
        self._scopes = tuple(scopes)
        self._ttl = ttl_seconds
        self._token = ""
        self._renew_at = 0.0
        self._lock = threading.Lock()

    def header(self) -> str:
        now = time.time()
        with self._lock:
            if now >= self._renew_at:
                self._token = mint_token(self._key, self._subject, self._scopes, self._ttl, now)
                self._renew_at = now + self._ttl / 2
            return f"Bearer {self._token}"
