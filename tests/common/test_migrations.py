"""Migrations on SQLite and PostgreSQL; services refuse an unmigrated database."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from services.common import migrate
from services.common.db import create_engine
from tests.support.tokens import Keys

SERVICES = ("wallet", "receipts", "payouts")
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_migrations_apply_and_are_detected(database_url: str) -> None:
    engine = create_engine(database_url, 1)
    try:
        for service in SERVICES:
            with pytest.raises(migrate.NotMigrated, match="coinstore migrate"):
                migrate.check_migrated(service, engine)
        for service in SERVICES:
            migrate.upgrade(service, database_url)
            migrate.check_migrated(service, engine)
            migrate.upgrade(service, database_url)  # idempotent
        tables = set(sa.inspect(engine).get_table_names())
        for service in SERVICES:
            assert f"alembic_version_{service}" in tables
            assert f"{service}_request_log" in tables
    finally:
        engine.dispose()


def test_migrate_command(database_url: str) -> None:
    env = {**os.environ, "COINSTORE_DATABASE_URL": database_url}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    engine = create_engine(database_url, 1)
    try:
        for service in SERVICES:
            migrate.check_migrated(service, engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("service", SERVICES)
def test_service_refuses_unmigrated_database(service: str, sqlite_url: str, keys: Keys) -> None:
    env = {
        **os.environ,
        "COINSTORE_DATABASE_URL": sqlite_url,
        "COINSTORE_AUTH_TRUSTED_KEYS": str(keys.public_path),
        "COINSTORE_AUTH_SIGNING_KEY": str(keys.private_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "not migrated" in result.stderr
    assert "coinstore migrate" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("COINSTORE_WALLET_GRPC_PORT", "not-a-port", "COINSTORE_WALLET_GRPC_PORT"),
        ("COINSTORE_AUTH_TRUSTED_KEYS", "/nonexistent/key.pem", "COINSTORE_AUTH_TRUSTED_KEYS"),
        ("COINSTORE_CATALOG", "/nonexistent/catalog.toml", "COINSTORE_CATALOG"),
    ],
)
def test_service_names_bad_configuration(variable: str, value: str, named: str, sqlite_url: str, keys: Keys) -> None:
    env = {
        **os.environ,
        "COINSTORE_DATABASE_URL": sqlite_url,
        "COINSTORE_AUTH_TRUSTED_KEYS": str(keys.public_path),
        variable: value,
    }
    result = subprocess.run(
        [sys.executable, "-m", "services.wallet"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr


RECEIPTS_OLD_HEADS = {"receipts_0002", "receipts_google_0001", "receipts_inbox_0001"}


def test_receipts_history_has_one_head_and_a_database_at_the_old_heads_reaches_it(database_url: str) -> None:
    config = migrate.alembic_config("receipts", database_url)
    (newest,) = ScriptDirectory.from_config(config).get_heads()
    engine = create_engine(database_url, 1)
    try:
        # Where `coinstore migrate` left every database before the heads were joined.
        for head in sorted(RECEIPTS_OLD_HEADS):
            migrate.upgrade("receipts", database_url, head)
        assert _receipts_revisions(engine) == RECEIPTS_OLD_HEADS
        with pytest.raises(migrate.NotMigrated):
            migrate.check_migrated("receipts", engine)
        now = datetime.now(UTC)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO receipts_account_bindings (account_id, app_account_token, obfuscated_account_id,"
                    " created_at) VALUES ('fan-1', 'token-1', 'obfuscated-1', :now)"
                ),
                {"now": now},
            )
        migrate.upgrade("receipts", database_url)
        assert _receipts_revisions(engine) == {newest}
        migrate.check_migrated("receipts", engine)
        with engine.connect() as conn:
            kept = conn.execute(sa.text("SELECT account_id FROM receipts_account_bindings")).scalars().all()
        assert kept == ["fan-1"]
        # And back: the join undoes to the three heads, with their tables.
        command.downgrade(config, "receipts_0003")
        command.downgrade(config, "receipts_0002")
        assert _receipts_revisions(engine) == RECEIPTS_OLD_HEADS
        tables = set(sa.inspect(engine).get_table_names())
        assert {"receipts_purchases", "receipts_google_consumptions", "receipts_notifications"} <= tables
    finally:
        engine.dispose()


def _receipts_revisions(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": "alembic_version_receipts"})
        return set(context.get_current_heads())
