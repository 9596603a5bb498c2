"""Crash safety with real processes: the receipts service stores a
notification and is killed (SIGKILL) before anything processed it, and the
broker message is gone too; after a restart the worker's sweeper finds the row
and applies it exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common import migrate
from services.common.db import Database
from services.receipts.notifications.parse import APPLE
from services.receipts.notifications.store import InboxStore
from services.storesim import apple as apple_sim
from tests.notifications.apple_payloads import notification
from tests.notifications.system import credit_directly
from tests.support.ports import free_port
from tests.support.tokens import Keys
from tests.wallet.support import running_wallet

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def process(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        child = subprocess.Popen([sys.executable, *args], env=env, cwd=cwd, stdout=out, stderr=out)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


async def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not come up")
            await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_stored_but_unprocessed_notification_is_processed_once_after_a_crash(
    database_url: str, keys: Keys, tmp_path: Path
) -> None:
    store = apple_sim.create_store(tmp_path / "storesim")
    migrate.upgrade("receipts", database_url)
    broker = tmp_path / "broker.db"
    (tmp_path / "var").mkdir()  # the worker keeps its beat schedule in ./var (as under `make run`)
    async with running_wallet(database_url, keys, tmp_path) as wallet:
        await credit_directly(wallet, "fan-crash", wpb.STORE_APP_STORE, "4000000000000001", 350)
        webhook_port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'gen'}",
            "COINSTORE_DATABASE_URL": database_url,
            "COINSTORE_BROKER_URL": f"sqla+sqlite:///{broker}",
            "COINSTORE_WEBHOOK_PORT": str(webhook_port),
            "COINSTORE_RECEIPTS_GRPC_PORT": str(free_port()),
            "COINSTORE_RECEIPTS_METRICS_PORT": str(free_port()),
            "COINSTORE_WALLET_ADDRESS": f"127.0.0.1:{wallet.port}",
            "COINSTORE_AUTH_SIGNING_KEY": str(keys.private_path),
            "COINSTORE_AUTH_TRUSTED_KEYS": str(keys.public_path),
            "COINSTORE_CATALOG": str(REPO / "deploy" / "catalog.toml"),
            "COINSTORE_APPLE_ROOT_CERTS": str(tmp_path / "storesim" / "apple" / "root.der"),
            "COINSTORE_APPLE_API_KEY_FILE": str(tmp_path / "storesim" / "apple" / "SubscriptionKey.p8"),
            "COINSTORE_NOTIFICATIONS_SWEEP_SECONDS": "1",
            "COINSTORE_LOG_FORMAT": "text",
        }
        tx = store.transaction(store.buy("com.coinstore.coins.350")[0])
        assert tx is not None
        tx["transactionId"] = "4000000000000001"
        store.transactions["4000000000000001"] = apple_sim.Transaction(tx, "crash")
        store.refund("4000000000000001")
        body = notification(store.sign, "REFUND", store.signed_transaction("4000000000000001"))
        url = f"http://127.0.0.1:{webhook_port}"
        log = tmp_path / "processes.log"

        with process(["-m", "services.receipts"], env, tmp_path, log) as receipts:
            await _wait_http(url + "/healthz")
            async with (
                aiohttp.ClientSession() as session,
                session.post(url + "/notifications/apple/v2", json=body) as reply,
            ):
                assert reply.status == 200
            receipts.kill()  # SIGKILL: no shutdown, nothing processed
            receipts.wait()
        broker.unlink()  # and the task message is lost with the embedded broker

        database = Database.from_url(database_url, 2)
        inbox = InboxStore(database)
        try:
            uuid_ = _uuid_of(body["signedPayload"])
            stored = inbox.get(APPLE, uuid_)
            assert stored is not None
            assert inbox.outcome(stored.id)[0] == "pending"
            assert (await wallet.balance("fan-crash")).coins == 350

            worker_args = ["-m", "services.receipts.worker", "--beat", "--pool", "solo", "--concurrency", "1"]
            with process(["-m", "services.receipts"], env, tmp_path, log), process(worker_args, env, tmp_path, log):
                await _wait_http(url + "/healthz")
                deadline = time.monotonic() + 120
                while inbox.outcome(stored.id)[0] != "processed":
                    assert time.monotonic() < deadline, log.read_text()[-4000:]
                    await asyncio.sleep(0.25)
                # Apple retries the same notification after the restart: acknowledged, not applied again.
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(url + "/notifications/apple/v2", json=body) as reply,
                ):
                    assert reply.status == 200
                    assert "duplicate" in await reply.text()
                await asyncio.sleep(3)  # a few sweeps
            assert inbox.outcome(stored.id)[:2] == ("processed", "reversed")
            assert inbox.get(APPLE, uuid_).attempts == 1  # type: ignore[union-attr]
            assert (await wallet.balance("fan-crash")).coins == 0
            history = await wallet.stub.ListTransactions(
                wpb.ListTransactionsRequest(account_id="fan-crash"), metadata=wallet.md(), timeout=10
            )
            assert sorted(t.coins_delta for t in history.transactions) == [-350, 350]
        finally:
            database.close()


def _uuid_of(signed_payload: str) -> str:
    import jwt

    return str(jwt.decode(signed_payload, options={"verify_signature": False})["notificationUUID"])
