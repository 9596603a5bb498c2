"""Store notification webhook benchmark.

Sustained App Store REFUND notifications (signed V2 payloads with a signed
transaction, each with its own notificationUUID) POSTed at concurrency 32 to
the receipts service's webhook, run as a real process on a fresh PostgreSQL
database. Each answer is a 200 only after the row is committed and the
processing task is queued (Redis when reachable, else the embedded broker).
Reported: throughput and p50/p99 latency of new notifications, then of the
same notifications delivered again (Apple's retries: deduplicated, nothing
stored or queued).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from kombu.connection import Connection

from services.common import auth, migrate
from services.storesim.apple import create_store
from tests.bench.common import BenchArgs, Result, percentiles, scratch_postgres
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CONCURRENCY = 32
REDIS = "redis://127.0.0.1:6379/15"


def _broker(directory: Path) -> tuple[str, str]:
    try:
        with Connection(REDIS, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return REDIS, "redis"
    except Exception:
        return f"sqla+sqlite:///{directory / 'broker.db'}", "embedded"


def _refunds(store: Any, count: int) -> list[dict[str, str]]:
    bodies = []
    for _ in range(count):
        transaction_id, _signed = store.buy("com.coinstore.coins.350", environment="Sandbox")
        payload = store.refund(transaction_id)
        notification = {
            "notificationType": "REFUND",
            "notificationUUID": str(uuid.uuid4()),
            "version": "2.0",
            "signedDate": store.clock(),
            "data": {
                "bundleId": store.bundle_id,
                "bundleVersion": "1.0",
                "environment": "Sandbox",
                "signedTransactionInfo": store.sign(payload),
            },
        }
        bodies.append({"signedPayload": store.sign(notification)})
    return bodies


async def _load(url: str, bodies: list[dict[str, str]]) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            nonlocal failures
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                async with session.post(url, json=body) as reply:
                    await reply.read()
                    if reply.status != 200:
                        failures += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        return time.perf_counter() - started, latencies, failures


async def _wait_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("the receipts service exited")
            try:
                async with session.get(url) as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the receipts service did not come up")


def run(args: BenchArgs) -> list[Result]:
    count = 600 if args.quick else 6000
    with tempfile.TemporaryDirectory() as tmp, scratch_postgres(args.admin_database_url) as database_url:
        directory = Path(tmp)
        store = create_store(directory / "storesim")
        auth.generate_keypair(directory / "private.pem", directory / "public.pem")
        migrate.upgrade("receipts", database_url)
        broker_url, broker = _broker(directory)
        bodies = _refunds(store, count)
        port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'gen'}",
            "COINSTORE_DATABASE_URL": database_url,
            "COINSTORE_BROKER_URL": broker_url,
            "COINSTORE_WEBHOOK_PORT": str(port),
            "COINSTORE_RECEIPTS_GRPC_PORT": str(free_port()),
            "COINSTORE_RECEIPTS_METRICS_PORT": str(free_port()),
            "COINSTORE_AUTH_SIGNING_KEY": str(directory / "private.pem"),
            "COINSTORE_AUTH_TRUSTED_KEYS": str(directory / "public.pem"),
            "COINSTORE_CATALOG": str(REPO / "deploy" / "catalog.toml"),
            "COINSTORE_APPLE_ROOT_CERTS": str(directory / "storesim" / "apple" / "root.der"),
            "COINSTORE_APPLE_API_KEY_FILE": str(directory / "storesim" / "apple" / "SubscriptionKey.p8"),
            "COINSTORE_LOG_LEVEL": "WARNING",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "services.receipts"],
            env=env,
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            asyncio.run(_wait_up(base + "/healthz", process))
            url = base + "/notifications/apple/v2"
            asyncio.run(_load(url, bodies[:50]))  # warm-up: connections, caches
            seconds, latencies, failures = asyncio.run(_load(url, bodies[50:]))
            p50, p99 = percentiles(latencies)
            notes = {"concurrency": str(CONCURRENCY), "broker": broker, "non_200": str(failures)}
            fresh = Result("webhook REFUND (stored + queued, PostgreSQL)", len(latencies), seconds, p50, p99, notes)
            seconds, latencies, failures = asyncio.run(_load(url, bodies[50:]))
            p50, p99 = percentiles(latencies)
            notes = {**notes, "non_200": str(failures)}
            replay = Result("webhook REFUND redelivered (deduplicated)", len(latencies), seconds, p50, p99, notes)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return [fresh, replay]
