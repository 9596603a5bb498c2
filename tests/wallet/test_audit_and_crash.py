"""Exactly-once under a duplicate storm, the audit command, and a SIGKILL in the
middle of a load leaving no half-applied transaction."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as pb_grpc
from services.common.db import create_engine
from services.wallet import tables
from services.wallet.audit import audit, audit_engine
from tests.support.failpoints import failpoint_env, fired_pid
from tests.support.status import error_info
from tests.support.tokens import Keys
from tests.support.waiting import serving
from tests.wallet.support import ALL_SCOPES, Wallet, credit_request, migrated, running_wallet, write_catalog

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
async def test_duplicate_storm_credits_each_receipt_once(wallet: Wallet) -> None:
    receipts, copies = 1000, 10
    channels = [grpc.aio.insecure_channel(wallet.address) for _ in range(copies)]
    stubs = [pb_grpc.WalletServiceStub(c) for c in channels]
    metadata = wallet.md("wallet:credit")
    states: list[int] = []
    limit = asyncio.Semaphore(200)

    async def attempt(receipt: int, copy: int) -> None:
        request = credit_request(
            f"fan-{receipt % 50}", 10, stx=f"storm-{receipt}", request_id=f"storm-{receipt}-{copy}"
        )
        async with limit:
            reply = await stubs[copy].CreditPurchase(request, metadata=metadata, timeout=120)
        states.append(reply.state)

    try:
        await asyncio.gather(*(attempt(r, c) for r in range(receipts) for c in range(copies)))
    finally:
        for channel in channels:
            await channel.close(None)
    assert states.count(pb.CREDIT_STATE_CREDITED) == receipts
    assert states.count(pb.CREDIT_STATE_ALREADY_CREDITED) == receipts * (copies - 1)
    with wallet.database.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tables.purchases)).scalar_one() == receipts
        assert (
            conn.execute(
                sa.select(sa.func.count())
                .select_from(tables.transactions)
                .where(tables.transactions.c.kind == "PURCHASE")
            ).scalar_one()
            == receipts
        )
    balances = [await wallet.balance(f"fan-{i}") for i in range(50)]
    assert sum(b.coins for b in balances) == receipts * 10
    assert audit(wallet.database) == []


def run_audit(url: str, keys: Keys) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "COINSTORE_DATABASE_URL": url,
        "COINSTORE_AUTH_TRUSTED_KEYS": str(keys.public_path),
        "COINSTORE_AUTH_SIGNING_KEY": str(keys.private_path),
    }
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "wallet", "audit"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_audit_command_finds_discrepancies(wallet: Wallet, keys: Keys) -> None:
    await wallet.credit("fan", 100)
    await wallet.gift("fan", "creator", "panda")
    clean = run_audit(wallet.url, keys)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "audit clean" in clean.stdout
    with wallet.database.engine.begin() as conn:
        conn.execute(
            tables.balances.update()
            .where(tables.balances.c.account_id == "fan")
            .values(balance=tables.balances.c.balance + 7)
        )
        txn_id = conn.execute(sa.select(tables.transactions.c.txn_id).limit(1)).scalar_one()
        conn.execute(
            tables.entries.insert().values(txn_id=txn_id, account_id="#sys/gift_revenue", currency="COIN", amount=3)
        )
        # Provenance: a lot claims coins it does not have, a gift's attribution is off by one.
        conn.execute(tables.purchases.update().values(open_coins=tables.purchases.c.open_coins + 5))
        conn.execute(tables.consumptions.update().values(diamonds=tables.consumptions.c.diamonds + 1))
        lot_id = conn.execute(sa.select(tables.purchases.c.lot_id)).scalar_one()
    dirty = run_audit(wallet.url, keys)
    assert dirty.returncode == 1
    assert "account fan COIN: balance row 102, entries sum to 95" in dirty.stdout
    assert f"transaction {txn_id}: COIN entries sum to 3, not 0" in dirty.stdout
    assert "ledger: all COIN entries sum to 3, not 0" in dirty.stdout
    assert f"lot {lot_id} (APP_STORE/PRODUCTION/" in dirty.stdout
    assert "account fan COIN: balance 102, open lots hold 100" in dirty.stdout
    assert "creator received 5 DIAMOND, attributed 6" in dirty.stdout


def start_service(
    url: str, keys: Keys, catalog: Path, port: int, extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "COINSTORE_DATABASE_URL": url,
        "COINSTORE_CATALOG": str(catalog),
        "COINSTORE_AUTH_TRUSTED_KEYS": str(keys.public_path),
        "COINSTORE_AUTH_SIGNING_KEY": str(keys.private_path),
        "COINSTORE_WALLET_GRPC_PORT": str(port),
        "COINSTORE_WALLET_METRICS_PORT": "0",
        "COINSTORE_LOG_LEVEL": "WARNING",
        **(extra or {}),
    }
    return subprocess.Popen([sys.executable, "-m", "services.wallet"], env=env, cwd=REPO_ROOT)


@pytest.mark.slow
async def test_sigkill_mid_batch_leaves_no_half_applied_transaction(
    database_url: str, keys: Keys, tmp_path: Path, free_port: int
) -> None:
    migrated(database_url)
    catalog = write_catalog(tmp_path)
    address = f"127.0.0.1:{free_port}"
    fans = [f"fan-{i}" for i in range(40)]
    credits = [
        credit_request(fan, 20, stx=f"k-{fan}-{n}", request_id=f"kc-{fan}-{n}") for fan in fans for n in range(5)
    ]
    gifts = [
        pb.SendGiftRequest(
            request_id=f"kg-{fan}-{n}",
            sender_account_id=fan,
            creator_account_id=f"star-{n % 3}",
            gift_id="panda",
            count=1,
        )
        for fan in fans
        for n in range(15)
    ]
    metadata = keys.metadata(*ALL_SCOPES)
    # Every credit lands; then the second batch of gifts dies after writing everything and before committing.
    points = tmp_path / "failpoints"
    process = start_service(
        database_url, keys, catalog, free_port, failpoint_env(points, "wallet.debit.before_commit=kill@2")
    )
    acknowledged: list[str] = []
    try:
        await serving(address, process)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.WalletServiceStub(channel)
            await asyncio.gather(*(stub.CreditPurchase(r, metadata=metadata, timeout=30) for r in credits))
            acknowledged += [r.request_id for r in credits]

            async def fire(request: pb.SendGiftRequest) -> None:
                try:
                    await stub.SendGift(request, metadata=metadata, timeout=30)
                    acknowledged.append(request.request_id)
                except grpc.aio.AioRpcError:
                    pass

            await asyncio.gather(*(fire(r) for r in gifts))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert fired_pid(points, "wallet.debit.before_commit") == process.pid
    assert 0 < len(acknowledged) < len(credits) + len(gifts), "the kill must land in the middle of the load"

    # Nothing half-applied: the ledger balances right after the crash, and every
    # acknowledged request is in it.
    engine = create_engine(database_url, 1)
    try:
        assert audit_engine(engine) == []
        with engine.connect() as conn:
            claimed = set(conn.execute(sa.select(tables.request_log.c.request_id)).scalars())
        assert set(acknowledged) <= claimed
    finally:
        engine.dispose()

    # Restart, replay every request with its original request id: each applies exactly once.
    process = start_service(database_url, keys, catalog, free_port)
    try:
        await serving(address, process)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.WalletServiceStub(channel)
            await asyncio.gather(*(stub.CreditPurchase(r, metadata=metadata, timeout=60) for r in credits))
            await asyncio.gather(*(stub.SendGift(r, metadata=metadata, timeout=60) for r in gifts))
            for fan in fans:
                balance = (await stub.GetBalance(pb.GetBalanceRequest(account_id=fan), metadata=metadata)).balance
                assert balance.coins == 100 - 15 * 5
            stars = [
                (
                    await stub.GetBalance(pb.GetBalanceRequest(account_id=f"star-{n}"), metadata=metadata)
                ).balance.diamonds
                for n in range(3)
            ]
            assert stars == [len(fans) * 5 * 5] * 3
    finally:
        process.terminate()
        process.wait(timeout=30)
    report = run_audit(database_url, keys)
    assert report.returncode == 0, report.stdout


async def test_duplicate_storm_without_group_commit(database_url: str, keys: Keys, tmp_path: Path) -> None:
    # One database transaction per request: the purchase key alone must stop the duplicates.
    async with running_wallet(database_url, keys, tmp_path, wallet_group_commit_window_ms=0.0) as wallet:
        channels = [grpc.aio.insecure_channel(wallet.address) for _ in range(10)]
        stubs = [pb_grpc.WalletServiceStub(c) for c in channels]
        try:
            replies = await asyncio.gather(
                *(
                    stubs[c].CreditPurchase(
                        credit_request("fan", 10, stx=f"s-{r}", request_id=f"s-{r}-{c}"),
                        metadata=wallet.md(),
                        timeout=120,
                    )
                    for r in range(100)
                    for c in range(10)
                )
            )
        finally:
            for channel in channels:
                await channel.close(None)
        assert [r.state for r in replies].count(pb.CREDIT_STATE_CREDITED) == 100
        assert (await wallet.balance("fan")).coins == 1000
        assert audit(wallet.database) == []


async def test_racing_accounts_for_one_receipt(wallet: Wallet) -> None:
    attempts = [
        wallet.stub.CreditPurchase(
            credit_request(f"acct-{i % 2}", 10, stx="contested", request_id=f"c-{i}"), metadata=wallet.md()
        )
        for i in range(40)
    ]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    winners = {r.balance.account_id for r in results if isinstance(r, pb.CreditPurchaseResponse)}
    assert len(winners) == 1
    denied = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(denied) == 20
    assert all(error_info(e).reason == "RECEIPT_BOUND_TO_OTHER_ACCOUNT" for e in denied)
    loser = "acct-1" if winners == {"acct-0"} else "acct-0"
    assert (await wallet.balance(loser)).coins == 0
    assert (await wallet.balance(winners.pop())).coins == 10
