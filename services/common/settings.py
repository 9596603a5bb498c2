"""Typed, frozen settings read once from ``COINSTORE_*`` environment variables.

Each service declares a frozen dataclass whose fields are made with :func:`setting`.
:func:`load_settings` reads the environment exactly once at start-up and raises
:class:`SettingsError` naming every missing or invalid variable.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlparse

from services.common.failpoints import Failpoints, parse_spec

PREFIX = "COINSTORE_"
_MISSING: Any = dataclasses.MISSING

T = TypeVar("T")


class SettingsError(Exception):
    """One or more settings are missing or invalid; the message names each variable."""


@dataclass(frozen=True)
class SettingDoc:
    env: str
    default: str
    doc: str
    secret: bool


def setting(
    name: str,
    doc: str,
    default: Any = _MISSING,
    *,
    parse: Callable[[str], Any] | None = None,
    secret: bool = False,
) -> Any:
    """A settings field read from ``COINSTORE_<name>``; no default means required."""
    metadata = {"env": PREFIX + name, "doc": doc, "parse": parse, "secret": secret}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults")
    return field(default=default, metadata=metadata)


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{raw!r} is not a boolean (true/false)")


def _parse_int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not an integer") from None


def _parse_port(raw: str) -> int:
    port = _parse_int(raw)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port (0-65535)")
    return port


def _parse_decimal(raw: str) -> Decimal:
    try:
        return Decimal(raw.strip())
    except InvalidOperation:
        raise ValueError(f"{raw!r} is not a decimal number") from None


def _parse_csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _parser_for(tp: Any) -> Callable[[str], Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _parser_for(args[0])
        return lambda raw: None if raw.strip() == "" else inner(raw)
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        item_parser = _parser_for(item)
        return lambda raw: tuple(item_parser(p) for p in _parse_csv(raw))
    if tp is bool:
        return _parse_bool
    if tp is int:
        return _parse_int
    if tp is Decimal:
        return _parse_decimal
    if tp is Path:
        return lambda raw: Path(raw.strip())
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        members = {m.value.lower() if isinstance(m.value, str) else str(m.value): m for m in tp}

        def parse_enum(raw: str) -> Any:
            try:
                return members[raw.strip().lower()]
            except KeyError:
                raise ValueError(f"{raw!r} is not one of {', '.join(sorted(members))}") from None

        return parse_enum
    if tp is str:
        return lambda raw: raw
    raise TypeError(f"no parser for settings type {tp!r}")


S = TypeVar("S")


def load_settings(cls: type[S], environ: Mapping[str, str] | None = None) -> S:
    """Build ``cls`` from the environment, naming every bad or missing variable at once."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f.metadata.get("env")
        if name is None:
            continue
        raw = env.get(name)
        if raw is None or (raw.strip() == "" and f.default is not _MISSING):
            if f.default is _MISSING:
                problems.append(f"{name} is required ({f.metadata['doc']})")
            continue
        parse = f.metadata.get("parse") or _parser_for(hints[f.name])
        try:
            values[f.name] = parse(raw)
        except (ValueError, TypeError) as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        raise SettingsError("invalid configuration: " + "; ".join(problems))
    instance = cls(**values)
    check = getattr(instance, "validate", None)
    if check is not None:
        check()
    return instance


def describe(cls: type[Any]) -> list[SettingDoc]:
    """Rows for the README's configuration table."""
    rows = []
    for f in dataclasses.fields(cls):
        if "env" not in f.metadata:
            continue
        if f.default is _MISSING:
            default = "(required)"
        elif isinstance(f.default, tuple):
            default = ",".join(str(x) for x in f.default)
        elif isinstance(f.default, enum.Enum):
            default = str(f.default.value)
        elif f.default is None:
            default = "(unset)"
        else:
            default = str(f.default)
        rows.append(SettingDoc(f.metadata["env"], default, f.metadata["doc"], f.metadata["secret"]))
    return rows


class LogFormat(enum.Enum):
    JSON = "json"
    TEXT = "text"


class DeployEnvironment(enum.Enum):
    """development (the defaults: simulators, dev keys) or production (start-up refuses unsafe settings)."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


@dataclass(frozen=True, kw_only=True, repr=False)
class CommonSettings:
    """Settings every coinstore process reads."""

    # The service these settings run (its own database URL is the one production judges);
    # empty for tools that may reach every service's database.
    SERVICE: ClassVar[str] = ""
    USES_BROKER: ClassVar[bool] = True
    # Whether the process calls other services (and so signs tokens with AUTH_SIGNING_KEY).
    CALLS_SERVICES: ClassVar[bool] = True

    database_url: str = setting(
        "DATABASE_URL",
        "SQLAlchemy URL of the database (sqlite:///… or postgresql://…)",
        "sqlite:///var/coinstore.db",
        secret=True,
    )
    wallet_database_url: str = setting(
        "WALLET_DATABASE_URL",
        "The wallet's database URL, e.g. as its own role (overrides COINSTORE_DATABASE_URL for the wallet)",
        "",
        secret=True,
    )
    receipts_database_url: str = setting(
        "RECEIPTS_DATABASE_URL",
        "The receipts service's database URL (overrides COINSTORE_DATABASE_URL for receipts and its worker)",
        "",
        secret=True,
    )
    payouts_database_url: str = setting(
        "PAYOUTS_DATABASE_URL",
        "The payouts service's database URL (overrides COINSTORE_DATABASE_URL for payouts and its worker)",
        "",
        secret=True,
    )
    broker_url: str = setting(
        "BROKER_URL",
        "Celery broker; the default is an embedded SQLite broker that needs no server",
        "sqla+sqlite:///var/broker.db",
        secret=True,
    )
    catalog: Path = setting(
        "CATALOG", "Path of the product, gift and payout catalog (TOML)", Path("deploy/catalog.toml")
    )
    auth_trusted_keys: tuple[Path, ...] = setting(
        "AUTH_TRUSTED_KEYS",
        "Comma-separated PEM public keys whose ES256 caller tokens are trusted",
        (Path("var/auth/dev-public.pem"),),
    )
    auth_signing_key: Path = setting(
        "AUTH_SIGNING_KEY",
        "PEM private key this process signs its own calls to other services with",
        Path("var/auth/dev-private.pem"),
        secret=True,
    )
    auth_signing_key_id: str = setting(
        "AUTH_SIGNING_KEY_ID", "kid of this process's signing key, as the key policy names it", ""
    )
    auth_key_policy: Path | None = setting(
        "AUTH_KEY_POLICY",
        "TOML key policy: the trusted keys (kid, public key) and the subjects, scopes, act and lifetime each may sign"
        " (unset: COINSTORE_AUTH_TRUSTED_KEYS, unrestricted; development only)",
        None,
    )
    bind_host: str = setting("BIND_HOST", "Address the gRPC, HTTP and metrics servers listen on", "127.0.0.1")
    receipts_grpc_port: int = setting("RECEIPTS_GRPC_PORT", "Receipts service gRPC port", 50051)
    wallet_grpc_port: int = setting("WALLET_GRPC_PORT", "Wallet service gRPC port", 50052)
    payouts_grpc_port: int = setting("PAYOUTS_GRPC_PORT", "Payouts service gRPC port", 50053)
    webhook_port: int = setting("WEBHOOK_PORT", "Receipts service webhook HTTP port", 8080)
    storesim_port: int = setting("STORESIM_PORT", "Store simulator HTTP port", 8090)
    receipts_metrics_port: int = setting("RECEIPTS_METRICS_PORT", "Receipts Prometheus metrics port", 9101)
    wallet_metrics_port: int = setting("WALLET_METRICS_PORT", "Wallet Prometheus metrics port", 9102)
    payouts_metrics_port: int = setting("PAYOUTS_METRICS_PORT", "Payouts Prometheus metrics port", 9103)
    wallet_address: str = setting("WALLET_ADDRESS", "host:port other services reach the wallet at", "127.0.0.1:50052")
    wallet_call_timeout_seconds: float = setting(
        "WALLET_CALL_TIMEOUT_SECONDS",
        "Deadline of each call receipts and payouts make to the wallet; past it the call answers UNAVAILABLE"
        " (WALLET_UNAVAILABLE) and is retried later with the same request id",
        10.0,
        parse=float,
    )
    shutdown_grace_seconds: float = setting(
        "SHUTDOWN_GRACE_SECONDS",
        "Seconds in-flight RPCs get to finish after SIGTERM",
        10.0,
        parse=float,
    )
    db_pool_size: int = setting("DB_POOL_SIZE", "Database connections per process", 16)
    db_statement_timeout_ms: int = setting(
        "DB_STATEMENT_TIMEOUT_MS",
        "PostgreSQL statement_timeout of service sessions (0 = none; the audit, migrations and reports set their own)",
        30_000,
    )
    environment: DeployEnvironment = setting(
        "ENVIRONMENT",
        "development, or production: start-up then stops, naming each unsafe setting (dev keys, simulator URLs, …)",
        DeployEnvironment.DEVELOPMENT,
    )
    grpc_reflection: bool = setting(
        "GRPC_REFLECTION", "Serve gRPC server reflection (make run turns it on; never in production)", False
    )
    grpc_max_concurrent_rpcs: int = setting(
        "GRPC_MAX_CONCURRENT_RPCS",
        "RPCs a gRPC server runs at once; callers beyond it get RESOURCE_EXHAUSTED (safe to retry)",
        1000,
    )
    test_only_allowed_urls: tuple[str, ...] = setting(
        "TEST_ONLY_ALLOWED_URLS",
        "Tests only, never in a manifest: https URL prefixes production mode accepts although they are loopback"
        " (a simulator serving https with a test CA); logged at start-up",
        (),
    )
    tls_ca_file: Path | None = setting(
        "TLS_CA_FILE", "Extra CA certificates (PEM) outbound HTTPS calls trust, e.g. a private or test CA", None
    )
    outbound_max_response_bytes: int = setting(
        "OUTBOUND_MAX_RESPONSE_BYTES",
        "Largest response an outside system (stores, OCSP, Google keys, PayPal) may send; abandoned while streaming",
        8 * 1024 * 1024,
    )
    grpc_max_message_bytes: int = setting(
        "GRPC_MAX_MESSAGE_BYTES", "Largest gRPC request or response a server accepts or sends", 4 * 1024 * 1024
    )
    log_level: str = setting("LOG_LEVEL", "Log level (DEBUG, INFO, WARNING, ERROR)", "INFO")
    log_format: LogFormat = setting("LOG_FORMAT", "json or text", LogFormat.JSON)
    failpoints: str = setting(
        "FAILPOINTS",
        "Tests only: failpoints to fire, e.g. `wallet.batch.before_commit=kill` (services/common/failpoints.py)",
        "",
    )
    failpoints_dir: Path = setting(
        "FAILPOINTS_DIR",
        "Where fired failpoints leave their markers (one firing per point across processes)",
        Path("var/failpoints"),
    )

    def __repr__(self) -> str:
        """Settings print their secrets as ***, wherever they are printed or logged."""
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            shown.append(f"{f.name}={'***' if f.metadata.get('secret') and value else repr(value)}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @property
    def production(self) -> bool:
        return self.environment is DeployEnvironment.PRODUCTION

    def production_problems(self) -> list[str]:
        """What makes these settings unsafe in production, one line each naming the setting.

        Each service's settings add their own (dev secrets, simulator URLs, Sandbox for
        everyone); in production mode start-up stops on any of them."""
        problems = []
        if self.auth_key_policy is None:
            problems.append(
                f"{PREFIX}AUTH_KEY_POLICY is not set: production trusts keys only with their subjects, scopes"
                " and lifetimes"
            )
        signing = [("AUTH_SIGNING_KEY", self.auth_signing_key)] if self.CALLS_SERVICES else []
        for name, path in (*signing, *(("AUTH_TRUSTED_KEYS", p) for p in self.auth_trusted_keys)):
            if path.name.startswith("dev-") or "var/auth" in path.as_posix():
                problems.append(f"{PREFIX}{name} is the development key {path}")
        if self.grpc_reflection:
            problems.append(f"{PREFIX}GRPC_REFLECTION is on: reflection is for development")
        for name, url in self._database_urls_used():
            if url.startswith("sqlite"):
                problems.append(f"{PREFIX}{name} is SQLite: production runs on PostgreSQL")
        if self.USES_BROKER and self.broker_url.startswith(("sqla+", "sqlalchemy+")):
            problems.append(f"{PREFIX}BROKER_URL is the embedded SQLite broker: use Redis or RabbitMQ")
        return problems

    def _database_urls_used(self) -> list[tuple[str, str]]:
        if not self.SERVICE:
            return [
                (f"{service.upper()}DATABASE_URL", getattr(self, f"{service}database_url"))
                for service in ("", "wallet_", "receipts_", "payouts_")
            ]
        own = f"{self.SERVICE}_database_url"
        if getattr(self, own, ""):
            return [(own.upper(), getattr(self, own))]
        return [("DATABASE_URL", self.database_url)]

    def at_default(self, name: str) -> bool:
        """True when the setting ``name`` (a field) still has its development default."""
        default = next(f.default for f in dataclasses.fields(self) if f.name == name)
        return bool(getattr(self, name) == default)

    def url_problem(self, name: str, url: str) -> str | None:
        """Production: an outside system is reached over https, never at a loopback simulator
        (unless a test names the URL in COINSTORE_TEST_ONLY_ALLOWED_URLS, still https)."""
        parsed = urlparse(url)
        if parsed.scheme != "https":
            return f"{PREFIX}{name} is {url!r}: production calls outside systems over https only"
        if any(url.startswith(prefix) for prefix in self.test_only_allowed_urls):
            return None
        if parsed.hostname in ("127.0.0.1", "localhost", "::1") or (parsed.hostname or "").startswith("127."):
            return f"{PREFIX}{name} is {url!r}: a loopback address is the store simulator, not the real system"
        return None

    def database_url_for(self, service: str) -> str:
        """The service's own database URL (its own role) when set, else the shared one."""
        own: str = getattr(self, f"{service}_database_url", "")
        return own or self.database_url

    def failpoint_set(self) -> Failpoints:
        """This process's failpoints (none unless COINSTORE_FAILPOINTS names some)."""
        return Failpoints.from_spec(self.failpoints, self.failpoints_dir)

    def validate(self) -> None:
        problems = []
        for name in (
            "receipts_grpc_port",
            "wallet_grpc_port",
            "payouts_grpc_port",
            "webhook_port",
            "storesim_port",
            "receipts_metrics_port",
            "wallet_metrics_port",
            "payouts_metrics_port",
        ):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                problems.append(f"{PREFIX}{name.upper()}: {port} is not a TCP port")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            problems.append(f"{PREFIX}LOG_LEVEL: {self.log_level!r} is not a log level")
        if self.db_pool_size < 1:
            problems.append(f"{PREFIX}DB_POOL_SIZE must be at least 1")
        if not 0.1 <= self.wallet_call_timeout_seconds <= 300:
            problems.append(f"{PREFIX}WALLET_CALL_TIMEOUT_SECONDS must be between 0.1 and 300")
        if self.db_statement_timeout_ms < 0:
            problems.append(f"{PREFIX}DB_STATEMENT_TIMEOUT_MS must not be negative")
        if self.grpc_max_concurrent_rpcs < 1:
            problems.append(f"{PREFIX}GRPC_MAX_CONCURRENT_RPCS must be at least 1")
        if self.outbound_max_response_bytes < 64 * 1024:
            problems.append(f"{PREFIX}OUTBOUND_MAX_RESPONSE_BYTES must be at least 65536")
        if self.grpc_max_message_bytes < 64 * 1024:
            problems.append(f"{PREFIX}GRPC_MAX_MESSAGE_BYTES must be at least 65536")
        try:
            parse_spec(self.failpoints)
        except ValueError as exc:
            problems.append(f"{PREFIX}FAILPOINTS: {exc}")
        if problems:
            raise SettingsError("invalid configuration: " + "; ".join(problems))
