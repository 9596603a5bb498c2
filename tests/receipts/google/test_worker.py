"""Consume after credit survives a worker killed mid-consume: a real receipts
worker subprocess (``python -m services.receipts.worker``) is SIGKILLed while
Google is answering its consume call; after a restart the purchase is
consumed (retrying a 409 on the way): by the beat sweep, which finds it still
unconsumed, where the broker keeps the killed worker's message from everyone
(the embedded broker loses it, Redis hides it for its visibility timeout), or
by the message RabbitMQ hands back. Credited once, consumed once; on SQLite
with the embedded broker and on PostgreSQL with Redis and with RabbitMQ."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from services.receipts.google.repository import ConsumeState, Consumption
from services.storesim.google import Fault, PlayState
from tests.receipts.google.support import google_settings, play_simulator_thread
from tests.receipts.support import REPO, receipts_service
from tests.support.receipts_backends import broker_url, dropped_queue, unique_queue, worker_backends
from tests.support.tokens import Keys
from tests.support.waiting import eventually


def start_worker(tmp_path: Path, env: dict[str, str], *, beat: bool, log_name: str) -> subprocess.Popen[bytes]:
    (tmp_path / "var").mkdir(exist_ok=True)  # where --beat keeps its schedule file
    argv = [sys.executable, "-m", "services.receipts.worker", "--pool", "solo", "--concurrency", "1"]
    if beat:
        argv.append("--beat")
    log = (tmp_path / log_name).open("wb")
    return subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(10)


def consumed(row: Consumption | None) -> bool:
    return row is not None and row.state is ConsumeState.CONSUMED


def consume_calls(play: PlayState) -> int:
    return sum(1 for method, path in play.requests if method == "POST" and path.split("?")[0].endswith(":consume"))


@worker_backends
@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_worker_killed_between_credit_and_consume(
    keys: Keys, database_url: str, broker_kind: str, tmp_path: Path
) -> None:
    broker = broker_url(broker_kind, tmp_path)
    with play_simulator_thread(tmp_path) as (play, base), dropped_queue(broker, unique_queue()) as queue:
        settings = {
            **google_settings(play, base, tmp_path),
            "BROKER_URL": broker,
            "RECEIPTS_QUEUE": queue,
            "GOOGLE_CONSUME_OVERDUE_SECONDS": "2",
            "GOOGLE_CONSUME_SWEEP_SECONDS": "1",
        }
        async with receipts_service(keys, database_url, tmp_path, settings) as receipts:
            google = receipts.components.google
            database = receipts.components.database
            token = play.buy("coins_70", account_id=receipts.components.binding.obfuscated_account_id("fan-1")).token
            request = pb.VerifyGooglePurchaseRequest(
                request_id="crash-1", account_id="fan-1", product_id="coins_70", purchase_token=token
            )
            reply = await receipts.stub.VerifyGooglePurchase(request, metadata=receipts.md(), timeout=30)
            assert reply.purchase.state == pb.PURCHASE_STATE_CREDITED

            def row_state() -> ConsumeState | None:
                row = google.consumptions.get(token)
                return row.state if row else None

            # Credit committed, consume queued but not done: the worker is not running yet.
            assert await database.run(row_state) is ConsumeState.UNCONSUMED
            env = {
                **os.environ,
                **{f"COINSTORE_{k}": v for k, v in settings.items()},
                "COINSTORE_DATABASE_URL": database_url,
                "COINSTORE_CATALOG": str(REPO / "deploy" / "catalog.toml"),
                "COINSTORE_AUTH_TRUSTED_KEYS": str(keys.public_path),
                "COINSTORE_AUTH_SIGNING_KEY": str(keys.private_path),
                "COINSTORE_LOG_FORMAT": "text",
            }
            # Google hangs on every consume: the worker is inside the call when it dies.
            play.inject(Fault("consume", 503, 1000, delay_seconds=5.0))
            worker = start_worker(tmp_path, env, beat=False, log_name="worker-1.log")
            try:
                await eventually(lambda: consume_calls(play) >= 1, "the worker's consume call", 60)
            finally:
                kill(worker)
            play.clear_faults()
            # Google answers the restarted worker's first consume with 409 concurrentUpdate: it retries.
            play.inject(Fault("consume", 409, 1))
            purchase = play.get(token)
            assert purchase is not None
            assert not purchase.consumed
            assert await database.run(row_state) is ConsumeState.UNCONSUMED

            restarted = start_worker(tmp_path, env, beat=True, log_name="worker-2.log")
            try:
                await eventually(lambda: purchase.consumed, "the sweep to consume the purchase", 90)
                await eventually(lambda: consumed(google.consumptions.get(token)), "the row", 30)
            finally:
                restarted.send_signal(signal.SIGTERM)
                try:
                    restarted.wait(15)
                except subprocess.TimeoutExpired:
                    kill(restarted)
            assert purchase.consumed
            assert purchase.consume_calls == 1
            assert consume_calls(play) >= 3  # the killed attempt, the 409, the successful retry
            assert play.faults == []
            # One verification, one CreditPurchase: consuming never asks the wallet again.
            assert [(c.account_id, c.coins) for c in receipts.wallet.credits] == [("fan-1", 70)]
            if broker_kind != "rabbitmq":
                assert "still unconsumed" in (tmp_path / "worker-2.log").read_text()
