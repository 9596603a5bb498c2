"""Payout batch end to end: N requested cash-outs on PostgreSQL → CreatePayoutBatch over gRPC →
a real Celery worker submits, polls and settles every item against the PayPal simulator
(a separate process) → batch COMPLETED. Reports items/s, and how it scales with the
provider chunk size and the worker's concurrency.

Set-up (untimed): the cash-out rows are written straight into the payouts tables and
their holds into the wallet stand-in (the in-memory reservation contract over gRPC, so
the figure is the payouts pipeline's own; the wallet bench measures the wallet's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc
from services.common import migrate
from services.common.db import create_engine
from services.payouts.store import cashouts
from tests.bench.common import BenchArgs, Result, scratch_postgres
from tests.payouts.fake_wallet import FakeWalletServer, Hold
from tests.payouts.harness import payouts_settings, settings_env, write_catalog
from tests.support.ports import free_port
from tests.support.tokens import make_keys

REDIS = "redis://127.0.0.1:6379/14"
TIMEOUT_SECONDS = 900.0


def _wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def _broker() -> str:
    try:
        import redis

        redis.Redis.from_url(REDIS, socket_connect_timeout=1).ping()
        return REDIS
    except Exception:
        return ""


@contextmanager
def _process(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as handle:
        child = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _seed(url: str, wallet: FakeWalletServer, count: int) -> None:
    now = datetime.now(UTC) - timedelta(minutes=1)
    rows = []
    for i in range(count):
        cashout_id = f"co_bench{i:09d}"
        creator = f"creator-{i}"
        rows.append(
            {
                "cashout_id": cashout_id,
                "creator_account_id": creator,
                "diamonds": 20_000,
                "amount_minor": 10_000,
                "currency": "USD",
                "rate": "0.005",
                "provider": "paypal",
                "receiver": f"creator{i}@example.com",
                "state": "REQUESTED",
                "attempt": 1,
                "reservation_id": cashout_id,
                "failure_reason": "",
                "provider_item_id": "",
                "provider_transaction_id": "",
                "provider_status": "",
                "wallet_action": None,
                "wallet_done": True,
                "request_day": now.date().isoformat(),
                "created_at": now,
                "updated_at": now,
            }
        )
        wallet.wallet.holds[cashout_id] = Hold(creator, 20_000)
    engine = create_engine(url, 2)
    with engine.begin() as conn:
        for start in range(0, count, 10_000):
            conn.execute(cashouts.insert(), rows[start : start + 10_000])
    engine.dispose()


def one_run(admin_url: str, broker: str, count: int, chunk: int, concurrency: int) -> Result:
    with tempfile.TemporaryDirectory(prefix="bench-payouts-") as raw, scratch_postgres(admin_url) as url:
        tmp = Path(raw)
        migrate.upgrade("payouts", url)
        keys_dir = tmp / "auth"
        keys_dir.mkdir()
        keys = make_keys(keys_dir)
        wallet = FakeWalletServer()
        sim_port, grpc_port = free_port(), free_port()
        settings = payouts_settings(
            database_url=url,
            broker_url=broker or f"sqla+sqlite:///{tmp / 'broker.db'}",
            catalog=write_catalog(tmp),
            keys=keys,
            wallet_address=wallet.address,
            paypal_url=f"http://127.0.0.1:{sim_port}/paypal",
            payout_chunk_size=chunk,
            payout_poll_seconds=1.0,
            payout_stuck_seconds=120.0,
            payout_sweep_seconds=30.0,
            paypal_timeout_seconds=60.0,
            payout_settle_concurrency=16,
        )
        env = settings_env(settings)
        env.update(
            {
                "COINSTORE_STORESIM_PORT": str(sim_port),
                "COINSTORE_STORESIM_STATE_DIR": str(tmp / "storesim"),
                "COINSTORE_PAYOUTS_GRPC_PORT": str(grpc_port),
                "COINSTORE_PAYOUTS_METRICS_PORT": "0",
                "COINSTORE_LOG_LEVEL": os.environ.get("BENCH_PAYOUTS_LOG_LEVEL", "WARNING"),
            }
        )
        _seed(url, wallet, count)
        python = sys.executable
        try:
            with (
                _process([python, "-m", "services.storesim"], env, tmp, tmp / "storesim.log"),
                _process([python, "-m", "services.payouts"], env, tmp, tmp / "payouts.log"),
                _process(
                    [python, "-m", "services.payouts.worker", f"--concurrency={concurrency}"],
                    env,
                    tmp,
                    tmp / "worker.log",
                ),
            ):
                _wait_http(f"http://127.0.0.1:{sim_port}/healthz", 60)
                channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
                grpc.channel_ready_future(channel).result(timeout=60)
                stub = pb_grpc.PayoutServiceStub(channel)
                ops = keys.metadata("payouts:ops")
                time.sleep(3)  # let the worker connect before the clock starts
                started = time.perf_counter()
                batch = stub.CreatePayoutBatch(
                    pb.CreatePayoutBatchRequest(request_id=f"bench-{uuid.uuid4().hex}"), metadata=ops, timeout=300
                ).batch
                while batch.state != pb.BATCH_STATE_COMPLETED:
                    if time.perf_counter() - started > TIMEOUT_SECONDS:
                        raise RuntimeError(f"batch not completed: {batch}\n{(tmp / 'worker.log').read_text()[-3000:]}")
                    time.sleep(1.0)
                    batch = stub.GetPayoutBatch(pb.GetPayoutBatchRequest(batch_id=batch.batch_id), metadata=ops).batch
                elapsed = time.perf_counter() - started
                if os.environ.get("BENCH_PAYOUTS_LOG_LEVEL"):
                    print((tmp / "worker.log").read_text()[-20000:])
                channel.close()
                with urllib.request.urlopen(f"http://127.0.0.1:{sim_port}/paypal/sim/payments", timeout=120) as reply:
                    report = json.loads(reply.read())
        finally:
            wallet.stop()
        paid = Counter(p["sender_item_id"] for p in report["payments"])
        assert len(paid) == count, f"{len(paid)} of {count} items paid"
        assert max(paid.values()) == 1, "an item was paid twice"
        assert sum(wallet.wallet.commits.values()) == count
        totals = {t.state: t.count for t in batch.totals}
        assert totals.get(pb.CASHOUT_STATE_PAID) == count
        return Result(
            f"payouts batch {count} items chunk={chunk} workers={concurrency}",
            count,
            elapsed,
            notes={"submissions": str(report["batches"]), "broker": "redis" if broker else "embedded"},
        )


def run(args: BenchArgs) -> list[Result]:
    broker = _broker()
    admin = args.admin_database_url
    results: list[Result] = []
    if args.quick:
        headline = (2_000, 500, 2)
        grid = [(2_000, 200, 2), (2_000, 500, 1)]
    else:
        headline = (100_000, 1000, 4)
        grid = [(20_000, 250, 2), (20_000, 1000, 2), (20_000, 5000, 2), (20_000, 1000, 1), (20_000, 1000, 4)]
    results.append(one_run(admin, broker, *headline))
    for count, chunk, concurrency in grid:
        results.append(one_run(admin, broker, count, chunk, concurrency))
    return results
