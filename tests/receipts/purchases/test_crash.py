"""Crash safety of crediting with real processes, receipts and the wallet on
separate databases. Concurrent verifications (one group commit, one
CreditPurchases batch) are cut short by a SIGKILL:

- of the receipts service between recording the purchases and calling the
  wallet (failpoint ``receipts.credit.before_wallet``);
- of the receipts service between the wallet's credit and marking the rows
  (``receipts.credit.after_wallet``);
- of the wallet in the middle of the batch's transaction (``wallet.credit.before_commit``).

No client retries. The receipts worker's beat sweep alone must then credit
every purchase that was recorded: afterwards a purchase is credited in the
wallet ⇔ it is recorded in receipts, each exactly once, and every row says
CREDITED."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from coinstore.receipts.v1 import receipt_service_pb2_grpc as pb_grpc
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as wpb_grpc
from services.common import migrate
from services.common.db import Database, is_sqlite
from services.storesim.apple import AppleStore
from tests.receipts.support import apple_simulator, simulator_settings
from tests.support.databases import postgres_database, sqlite_database
from tests.support.failpoints import failpoint_env, wait_fired
from tests.support.ports import free_port
from tests.support.receipts_processes import REPO, SERVICE, WORKER, child, receipts_env
from tests.support.tokens import Keys
from tests.support.waiting import eventually

BEFORE_WALLET = "receipts.credit.before_wallet"
AFTER_WALLET = "receipts.credit.after_wallet"
WALLET_MID_BATCH = "wallet.credit.before_commit"
WALLET = ["-m", "services.wallet"]
PURCHASES = 8
# The sweep runs every second and takes every recorded row at once.
SWEEP = {"CREDIT_SWEEP_SECONDS": "1", "CREDIT_SWEEP_GRACE_SECONDS": "0"}


@contextmanager
def another_database(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A second fresh database on the same backend: the wallet's own."""
    with sqlite_database(tmp_path) if is_sqlite(database_url) else postgres_database() as url:
        migrate.upgrade("wallet", url)
        yield url


def wallet_env(url: str, keys: Keys, port: int) -> dict[str, str]:
    return {
        "COINSTORE_DATABASE_URL": url,
        "COINSTORE_CATALOG": str(REPO / "deploy" / "catalog.toml"),
        "COINSTORE_WALLET_GRPC_PORT": str(port),
        "COINSTORE_WALLET_METRICS_PORT": str(free_port()),
    }


async def ready(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(address) as channel:
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                await asyncio.wait_for(channel.channel_ready(), 1)
                return
            except TimeoutError:
                assert time.monotonic() < deadline, f"{address} never answered"


async def wallet_credits(address: str, keys: Keys, accounts: list[str]) -> Counter[str]:
    """How many times the wallet credited each store transaction (the ledger's purchase entries)."""
    credited: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = wpb_grpc.WalletServiceStub(channel)
        for account in accounts:
            reply = await stub.ListTransactions(
                wpb.ListTransactionsRequest(account_id=account, page_size=500),
                metadata=keys.metadata("wallet:read"),
                timeout=30,
            )
            credited.update(t.reference for t in reply.transactions if t.kind == wpb.TRANSACTION_KIND_PURCHASE)
    return credited


def recorded_rows(database: Database) -> dict[str, str]:
    """Store transaction id → state of every row in receipts_purchases."""
    table = database.table("receipts_purchases")
    with database.connect() as conn:
        rows = conn.execute(sa.select(table.c.store_transaction_id, table.c.state)).all()
    return {str(row.store_transaction_id): str(row.state) for row in rows}


async def verify_concurrently(address: str, keys: Keys, store: AppleStore, accounts: list[str]) -> list[object]:
    """One purchase per account, all verified at once; the answers or errors."""
    md = keys.metadata("purchases:verify", subject="app-backend")
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 60)
        stub = pb_grpc.ReceiptServiceStub(channel)
        requests = []
        for account in accounts:
            binding = await stub.GetPurchaseBinding(
                pb.GetPurchaseBindingRequest(account_id=account), metadata=md, timeout=30
            )
            _txid, jws = store.buy("com.coinstore.coins.350", app_account_token=binding.app_account_token)
            requests.append(
                pb.VerifyApplePurchaseRequest(request_id=f"r-{account}", account_id=account, signed_transaction=jws)
            )
        calls = [stub.VerifyApplePurchase(r, metadata=md, timeout=30) for r in requests]
        return list(await asyncio.gather(*calls, return_exceptions=True))


@dataclass
class Crash:
    """Two separate databases, the App Store simulator, and the environments of the
    receipts processes and of the wallet process, with ``point`` armed to kill."""

    env: dict[str, str]
    wallet_env: dict[str, str]
    store: AppleStore
    failpoints: Path
    log: Path
    database: Database
    accounts: list[str]

    @property
    def receipts(self) -> str:
        return f"127.0.0.1:{self.env['COINSTORE_RECEIPTS_GRPC_PORT']}"

    @property
    def wallet(self) -> str:
        return f"127.0.0.1:{self.wallet_env['COINSTORE_WALLET_GRPC_PORT']}"


async def sweep_and_check(crash: Crash, tmp_path: Path, keys: Keys) -> None:
    """Only the worker runs (no client retries): every recorded purchase gets credited,
    once; nothing unrecorded is credited."""
    with child(WORKER, crash.env, tmp_path, crash.log):
        await eventually(
            lambda: set(recorded_rows(crash.database).values()) == {"credited"},
            "the sweep credits every recorded row",
            detail=lambda: crash.log.read_text()[-4000:],
        )
    recorded = recorded_rows(crash.database)
    credited = await wallet_credits(crash.wallet, keys, crash.accounts)
    assert set(credited) == set(recorded)
    assert set(credited.values()) == {1}


@asynccontextmanager
async def crash_setup(point: str, keys: Keys, database_url: str, tmp_path: Path) -> AsyncIterator[Crash]:
    migrate.upgrade("receipts", database_url)
    wallet_port = free_port()
    with another_database(database_url, tmp_path) as wallet_url:
        async with apple_simulator(tmp_path) as (store, url):
            env = receipts_env(database_url, keys, tmp_path, wallet_port, **simulator_settings(url), **SWEEP)
            # Armed in every process: it fires once, in the first to reach it.
            env.update(failpoint_env(tmp_path / "failpoints", f"{point}=kill"))
            database = Database.from_url(database_url, 2)
            try:
                yield Crash(
                    env,
                    {**env, **wallet_env(wallet_url, keys, wallet_port)},
                    store,
                    tmp_path / "failpoints",
                    tmp_path / "processes.log",
                    database,
                    [f"fan-{i}" for i in range(PURCHASES)],
                )
            finally:
                database.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("point", [BEFORE_WALLET, AFTER_WALLET])
async def test_receipts_killed_mid_credit(point: str, keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with crash_setup(point, keys, database_url, tmp_path) as crash:
        with child(WALLET, crash.wallet_env, tmp_path, crash.log) as wallet_process:
            await ready(crash.wallet, wallet_process, crash.log)
            with child(SERVICE, crash.env, tmp_path, crash.log) as receipts:
                await ready(crash.receipts, receipts, crash.log)
                answers = await verify_concurrently(crash.receipts, keys, crash.store, crash.accounts)
                assert wait_fired(crash.failpoints, point, 30) == receipts.pid
                assert receipts.wait(30) == -signal.SIGKILL
            assert any(isinstance(a, grpc.aio.AioRpcError) for a in answers)

            # Recorded before the wallet heard of them, and not marked credited.
            recorded = recorded_rows(crash.database)
            assert "recorded" in recorded.values()
            credited = await wallet_credits(crash.wallet, keys, crash.accounts)
            unmarked = {t for t, state in recorded.items() if state == "recorded"}
            if point == BEFORE_WALLET:
                assert not unmarked & set(credited)
            else:
                # Credited by the wallet, not known as such in receipts.
                assert unmarked & set(credited)
            await sweep_and_check(crash, tmp_path, keys)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_wallet_killed_mid_batch(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with crash_setup(WALLET_MID_BATCH, keys, database_url, tmp_path) as crash:
        with child(SERVICE, crash.env, tmp_path, crash.log) as receipts:
            with child(WALLET, crash.wallet_env, tmp_path, crash.log) as wallet_process:
                await ready(crash.wallet, wallet_process, crash.log)
                await ready(crash.receipts, receipts, crash.log)
                answers = await verify_concurrently(crash.receipts, keys, crash.store, crash.accounts)
                assert wait_fired(crash.failpoints, WALLET_MID_BATCH, 30) == wallet_process.pid
                assert wallet_process.wait(30) == -signal.SIGKILL
            unavailable = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
            assert unavailable
            assert {a.code() for a in unavailable} == {grpc.StatusCode.UNAVAILABLE}

        assert "recorded" in recorded_rows(crash.database).values()
        # The restarted wallet runs through the failpoint (it fired once already).
        with child(WALLET, crash.wallet_env, tmp_path, crash.log) as wallet_process:
            await ready(crash.wallet, wallet_process, crash.log)
            await sweep_and_check(crash, tmp_path, keys)
