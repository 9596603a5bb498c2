"""Per-service database roles on PostgreSQL: each service can run as a role that
reads and writes only its own tables, so the receipts pod cannot touch the ledger."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import errors

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from services.common.catalog import load_catalog
from services.common.clock import SystemClock
from services.common.db import Database, normalize_url
from services.common.settings import CommonSettings
from services.wallet.domain.ledger import Environment, Store
from services.wallet.store import CreditItem, WalletStore
from tests.wallet.support import write_catalog

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def roles(postgres_url: str) -> Iterator[dict[str, str]]:
    """Two login roles unique to this run (roles are cluster-wide), dropped afterwards."""
    tag = uuid.uuid4().hex[:8]
    names = {"wallet": f"cs_wallet_{tag}", "receipts": f"cs_receipts_{tag}"}
    admin = sa.create_engine(normalize_url(postgres_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for role in names.values():
            conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
    try:
        yield names
    finally:
        with admin.connect() as conn:
            for role in names.values():
                conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
                conn.exec_driver_sql(f'DROP ROLE "{role}"')
        admin.dispose()


def as_role(url: str, role: str) -> str:
    return sa.engine.make_url(normalize_url(url)).set(username=role).render_as_string(hide_password=False)


def psycopg_dsn(url: str) -> str:
    return sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def test_each_service_role_writes_only_its_own_tables(postgres_url: str, roles: dict[str, str], tmp_path: Path) -> None:
    env = {**os.environ, "COINSTORE_DATABASE_URL": postgres_url}
    grants = [f"--grant={service}={role}" for service, role in roles.items()]
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate", *grants],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    wallet_url, receipts_url = as_role(postgres_url, roles["wallet"]), as_role(postgres_url, roles["receipts"])

    # The wallet runs as its role: credits, lots (a sequence) and all.
    settings = CommonSettings(database_url=postgres_url, wallet_database_url=wallet_url)
    database = Database.from_url(settings.database_url_for("wallet"), 2)
    try:
        store = WalletStore(
            database, load_catalog(write_catalog(tmp_path)), SystemClock(), reservation_ttl=timedelta(days=1)
        )
        request = pb.CreditPurchaseRequest(request_id="r-1")
        item = CreditItem(
            "r-1",
            request,
            "fan",
            Store.APP_STORE,
            "t-1",
            "coins_100",
            100,
            0,
            1,
            Environment.PRODUCTION,
            "USA",
            199,
            "USD",
            None,
            False,
        )
        (answer,) = store.credit_batch([item], lambda result: pb.CreditPurchaseResponse(coins_credited=result.coins))
        assert answer == pb.CreditPurchaseResponse(coins_credited=100)
    finally:
        database.close()

    # ... but cannot read or write a receipts table; the receipts role cannot write the ledger.
    refused = [
        (wallet_url, "SELECT count(*) FROM receipts_purchases"),
        (
            wallet_url,
            "INSERT INTO receipts_request_log (method, request_id, request_hash, created_at)"
            " VALUES ('m', 'r', 'h', now())",
        ),
        (
            receipts_url,
            "INSERT INTO wallet_entries (txn_id, account_id, currency, amount) VALUES ('t', 'fan', 'COIN', 1000000)",
        ),
        (receipts_url, "UPDATE wallet_balances SET balance = balance + 1000000"),
        (receipts_url, "CREATE TABLE wallet_sneaky (x int)"),
    ]
    for url, statement in refused:
        with psycopg.connect(psycopg_dsn(url)) as conn, pytest.raises(errors.InsufficientPrivilege):
            conn.execute(statement)
    with psycopg.connect(psycopg_dsn(receipts_url)) as conn:
        assert conn.execute("SELECT count(*) FROM receipts_purchases").fetchone() == (0,)
