"""What every service process builds from its settings, and how it fails at start-up.

A bad setting, catalog or an unmigrated database stops the process with exit
status 2 and one line naming the problem (never a traceback).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from services.common.auth import (
    KeyRing,
    TokenSource,
    TokenVerifier,
    TrustedKey,
    load_key_policy,
    load_private_key,
    load_public_keys,
)
from services.common.catalog import Catalog, CatalogError, load_catalog
from services.common.db import Database
from services.common.failpoints import Failpoints
from services.common.logs import configure_logging
from services.common.metrics import Metrics
from services.common.migrate import NotMigrated, check_migrated
from services.common.settings import CommonSettings, SettingsError, load_settings

log = logging.getLogger(__name__)

S = TypeVar("S", bound=CommonSettings)

STARTUP_DB_WAIT_SECONDS = 60.0


class StartupError(Exception):
    """The process cannot start; the message says why and what to do."""


@dataclass
class Runtime:
    settings: CommonSettings
    database: Database
    verifier: TokenVerifier
    metrics: Metrics
    catalog: Catalog
    failpoints: Failpoints = field(default_factory=Failpoints)

    def token_source(self, subject: str, scopes: tuple[str, ...]) -> TokenSource:
        return token_source(self.settings, subject, scopes)


def load(cls: type[S], service: str) -> S:
    settings = load_settings(cls)
    configure_logging(service, settings.log_level, settings.log_format)
    check_production(settings)
    return settings


def check_production(settings: CommonSettings) -> None:
    """In production mode, stop naming every unsafe setting; log the test-only overrides."""
    if not isinstance(settings, CommonSettings) or not settings.production:
        return
    problems = settings.production_problems()
    if problems:
        raise SettingsError("production mode refuses to start: " + "; ".join(problems))
    for prefix in settings.test_only_allowed_urls:
        log.warning(
            "COINSTORE_TEST_ONLY_ALLOWED_URLS lets %s through: a test setting, never for a real deployment", prefix
        )


def token_source(settings: CommonSettings, subject: str, scopes: tuple[str, ...]) -> TokenSource:
    """This process's token for calls to other services, signed with its own key."""
    return TokenSource(load_private_key(settings.auth_signing_key), subject, scopes, kid=settings.auth_signing_key_id)


def key_ring(settings: CommonSettings) -> KeyRing:
    """The keys callers may sign with: the key policy's, or (development) the trusted key files unrestricted."""
    if settings.auth_key_policy is not None:
        return load_key_policy(settings.auth_key_policy)
    return KeyRing(tuple(TrustedKey(key) for key in load_public_keys(settings.auth_trusted_keys)))


def build_runtime(service: str, settings: CommonSettings, *, migrated: bool = True) -> Runtime:
    verifier = TokenVerifier(key_ring(settings))
    catalog = load_catalog(settings.catalog)
    database = Database.from_url(
        settings.database_url_for(service), settings.db_pool_size, settings.db_statement_timeout_ms
    )
    if migrated:
        _wait_for_migrated_database(service, database)
    return Runtime(settings, database, verifier, Metrics(service), catalog, settings.failpoint_set())


def _wait_for_migrated_database(service: str, database: Database) -> None:
    deadline = time.monotonic() + STARTUP_DB_WAIT_SECONDS
    while True:
        try:
            check_migrated(service, database.engine)
            return
        except NotMigrated:
            raise
        except Exception as exc:  # unreachable database: wait, it may be starting
            if time.monotonic() > deadline:
                raise StartupError(f"database unreachable: {exc}") from None
            log.warning("waiting for the database: %s", exc)
            time.sleep(1.0)


R = TypeVar("R")


def run_main(service: str, main: Callable[[], R]) -> R:
    """Run a process entry point, turning start-up errors into one clear line and exit 2."""
    try:
        return main()
    except (SettingsError, CatalogError, NotMigrated, StartupError) as exc:
        print(f"coinstore {service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
