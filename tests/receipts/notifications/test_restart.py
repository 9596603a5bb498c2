"""Crash safety with real processes: the receipts service is killed (SIGKILL,
failpoint ``receipts.webhook.after_commit``) after a notification's row
commits and before the task is queued or the store gets an answer. After a
restart the store's retry is a duplicate (not queued again), the worker's
sweeper finds the row and applies it exactly once, through the real wallet;
on SQLite with the embedded broker and on PostgreSQL with Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common import migrate
from services.common.db import Database
from services.receipts.notifications.parse import APPLE
from services.receipts.notifications.repository import InboxRepository, NewNotification
from services.storesim import apple as apple_sim
from tests.receipts.notifications.apple_payloads import notification
from tests.receipts.notifications.system import credit_directly
from tests.receipts.support import ledger
from tests.support.failpoints import failpoint_env, wait_fired
from tests.support.receipts_backends import broker_url, dropped_queue, unique_queue, worker_backends
from tests.support.receipts_processes import SERVICE, WORKER, child, receipts_env
from tests.support.tokens import Keys
from tests.wallet.support import running_wallet

AFTER_COMMIT = "receipts.webhook.after_commit"


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


async def _wait(condition: Callable[[], bool], what: str, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log.read_text()[-4000:]}"
        await asyncio.sleep(0.1)


@worker_backends
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_notification_committed_but_never_queued_is_applied_once_after_a_crash(
    database_url: str, broker_kind: str, keys: Keys, tmp_path: Path
) -> None:
    store = apple_sim.create_store(tmp_path / "storesim")
    migrate.upgrade("receipts", database_url)
    (tmp_path / "var").mkdir()  # the worker keeps its beat schedule in ./var (as under `make run`)
    broker = broker_url(broker_kind, tmp_path)
    failpoints = tmp_path / "failpoints"
    with dropped_queue(broker, unique_queue()) as queue:
        async with running_wallet(database_url, keys, tmp_path) as wallet:
            await credit_directly(wallet, "fan-crash", wpb.STORE_APP_STORE, "4000000000000001", 350)
            env = receipts_env(
                database_url,
                keys,
                tmp_path / "storesim",
                wallet.port,
                broker_url=broker,
                receipts_queue=queue,
                notifications_sweep_seconds="1",
            )
            # Every process gets the same failpoint: it fires once, in the first one to get there.
            env.update(failpoint_env(failpoints, f"{AFTER_COMMIT}=kill"))
            tx = store.transaction(store.buy("com.coinstore.coins.350")[0])
            assert tx is not None
            tx["transactionId"] = "4000000000000001"
            store.transactions["4000000000000001"] = apple_sim.Transaction(tx, "crash")
            store.refund("4000000000000001")
            body = notification(store.sign, "REFUND", store.signed_transaction("4000000000000001"))
            url = f"http://127.0.0.1:{env['COINSTORE_WEBHOOK_PORT']}"
            log = tmp_path / "processes.log"

            async def deliver() -> tuple[int, str]:
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(url + "/notifications/apple/v2", json=body) as reply,
                ):
                    return reply.status, await reply.text()

            with child(SERVICE, env, tmp_path, log) as receipts:
                await _wait_http(url + "/healthz")
                with pytest.raises(aiohttp.ClientError):
                    await deliver()  # the store gets no answer
                assert wait_fired(failpoints, AFTER_COMMIT, 30) == receipts.pid
                assert receipts.wait(30) == -signal.SIGKILL

            database = Database.from_url(database_url, 2)
            inbox = InboxRepository(database)
            try:
                uuid_ = _uuid_of(body["signedPayload"])
                stored = inbox.get(APPLE, uuid_)
                assert stored is not None
                # No process is left that could have touched it.
                assert inbox.outcome(stored.id)[0] == "pending"
                assert await ledger(wallet, "fan-crash") == [("4000000000000001", 350)]

                with child(SERVICE, env, tmp_path, log), child(WORKER, env, tmp_path, log):
                    await _wait_http(url + "/healthz")
                    # The store retries what it got no answer for: acknowledged as a duplicate, not queued.
                    assert await deliver() == (200, '{"status": "duplicate"}')
                    # Only the sweeper can find the row: nothing was ever queued for it.
                    await _wait(lambda: inbox.outcome(stored.id)[0] == "processed", "the sweeper", log)
                    # A row stored after that, and never queued, is processed only by a later sweep:
                    # once it is, the sweeper has run again and left the processed row alone.
                    marker = inbox.accept(
                        NewNotification(APPLE, f"marker-{uuid.uuid4()}", "TEST", None, None, "{}", {}),
                        datetime.now(UTC),
                    )
                    await _wait(lambda: inbox.outcome(marker.id)[0] == "processed", "a later sweep", log)
                assert inbox.outcome(stored.id)[:2] == ("processed", "reversed")
                assert inbox.get(APPLE, uuid_).attempts == 1  # type: ignore[union-attr]
                assert await ledger(wallet, "fan-crash") == [("4000000000000001", 350), ("4000000000000001", -350)]
            finally:
                database.close()


def _uuid_of(signed_payload: str) -> str:
    import jwt

    return str(jwt.decode(signed_payload, options={"verify_signature": False})["notificationUUID"])
