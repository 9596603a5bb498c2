"""Wallet benchmarks on PostgreSQL over gRPC (`make bench BENCH_ARGS="wallet --quick"`).

1. CreditPurchase of distinct receipts at concurrency 64, beside a bare gRPC echo
   server measured in the same run with the same client, in three alternating
   rounds (target: >= 50 % of echo; the median ratio is reported).
2. Hot creator: 1,000 senders gifting one creator concurrently, group commit vs the
   naive baseline (one database transaction per gift; COINSTORE_WALLET_GROUP_COMMIT_WINDOW_MS=0),
   same run, same database server (target: >= 3x).
3. Memory: the wallet process's RSS sampled while it books 1,000,000 gifts (flat = no growth).

The servers run as separate processes (python -m services.wallet), so the client's
CPU and memory are not counted as the server's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coinstore.type.v1 import money_pb2
from coinstore.wallet.v1 import wallet_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as pb_grpc
from services.common import auth, migrate
from tests.bench.common import BenchArgs, Result, percentiles, scratch_postgres
from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
ECHO_METHOD = "/bench.Echo/Echo"
CREDIT_METHOD = "/coinstore.wallet.v1.WalletService/CreditPurchase"
SCOPES = ("wallet:read", "wallet:gift", "wallet:credit")
CATALOG = """
[diamonds]
per_coin = "1"
holding_days = 0

[[packs]]
store = "app_store"
product_id = "coins_100"
coins = 100
price = "1.99"

[[gifts]]
id = "rose"
name = "Rose"
coin_price = 1
"""


async def _echo_server(port: int) -> None:
    def echo(request: bytes, _context: Any) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


@contextmanager
def _process(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(argv, env={**os.environ, **env}, cwd=REPO_ROOT)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _wait_port(address: str, health: bool) -> None:
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(address) as channel:
        while time.monotonic() < deadline:
            try:
                if health:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                else:
                    await channel.unary_unary(ECHO_METHOD, None, None)(b"ping", timeout=1)
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{address} never became ready")


@contextmanager
def _wallet(url: str, state: Path, window_ms: float, pool: int = 16) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {
        "COINSTORE_DATABASE_URL": url,
        "COINSTORE_CATALOG": str(state / "catalog.toml"),
        "COINSTORE_AUTH_TRUSTED_KEYS": str(state / "public.pem"),
        "COINSTORE_AUTH_SIGNING_KEY": str(state / "private.pem"),
        "COINSTORE_WALLET_GRPC_PORT": str(port),
        "COINSTORE_WALLET_METRICS_PORT": "0",
        "COINSTORE_LOG_LEVEL": "WARNING",
        "COINSTORE_DB_POOL_SIZE": str(pool),
        "COINSTORE_WALLET_GROUP_COMMIT_WINDOW_MS": str(window_ms),
    }
    with _process([sys.executable, "-m", "services.wallet"], env) as process:
        address = f"127.0.0.1:{port}"
        asyncio.run(_wait_port(address, health=True))
        yield address, process.pid


async def _drive(calls: Sequence[Callable[..., Awaitable[Any]]], concurrency: int) -> tuple[float, list[float], int]:
    """Run ``calls`` with at most ``concurrency`` in flight; returns (seconds, latencies, failures)."""
    latencies: list[float] = []
    failures = 0
    queue = iter(calls)

    async def worker() -> None:
        nonlocal failures
        for call in queue:
            started = time.perf_counter()
            try:
                await call()
            except grpc.aio.AioRpcError:
                failures += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, failures


def _credit(account: str, stx: str, coins: int = 100) -> pb.CreditPurchaseRequest:
    return pb.CreditPurchaseRequest(
        request_id=f"r-{stx}",
        account_id=account,
        store=pb.STORE_APP_STORE,
        store_transaction_id=stx,
        product_id="coins_100",
        coins=coins,
        quantity=1,
        environment=pb.STORE_ENVIRONMENT_PRODUCTION,
        storefront="USA",
        price=money_pb2.Money(amount_minor=199, currency_code="USD"),
    )


def _channels(address: str, count: int) -> list[grpc.aio.Channel]:
    # Separate channels so the client is not bottlenecked on one HTTP/2 connection.
    return [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)]


async def _bench_unary(name: str, address: str, method: str, payloads: list[bytes], metadata: Any) -> Result:
    """``payloads`` (serialized before the clock starts) through ``method`` at concurrency 64.

    The echo and CreditPurchase runs use this same client doing the same work per call
    (raw bytes out and in, the same metadata), so the difference is the server's."""
    channels = _channels(address, 4)
    methods = [c.unary_unary(method, None, None) for c in channels]
    calls = [
        (lambda i=i, payload=payload: methods[i % 4](payload, metadata=metadata, timeout=60))
        for i, payload in enumerate(payloads)
    ]
    seconds, latencies, failures = await _drive(calls, 64)
    for channel in channels:
        await channel.close(None)
    p50, p99 = percentiles(latencies)
    return Result(name, len(payloads), seconds, p50, p99, {"failures": str(failures)})


def _credit_payloads(n: int, tag: str) -> list[bytes]:
    return [_credit(f"buyer-{i % 5000}", f"{tag}-{i}").SerializeToString() for i in range(n)]


async def _bench_credit(address: str, metadata: Any, n: int, tag: str) -> Result:
    payloads = _credit_payloads(n, tag)
    name = "CreditPurchase distinct receipts c64"
    return await _bench_unary(name, address, CREDIT_METHOD, payloads, metadata)


async def _bench_echo(address: str, metadata: Any, n: int) -> Result:
    payloads = _credit_payloads(n, "echo")
    return await _bench_unary("bare gRPC echo c64 (baseline)", address, ECHO_METHOD, payloads, metadata)


async def _fund(address: str, metadata: Any, senders: list[str], coins: int, tag: str) -> None:
    channels = _channels(address, 4)
    stubs = [pb_grpc.WalletServiceStub(c) for c in channels]
    calls = [
        (lambda i=i, s=s: stubs[i % 4].CreditPurchase(_credit(s, f"{tag}-{s}", coins), metadata=metadata, timeout=60))
        for i, s in enumerate(senders)
    ]
    _, _, failures = await _drive(calls, 64)
    for channel in channels:
        await channel.close(None)
    if failures:
        raise RuntimeError(f"{failures} funding credits failed")


async def _bench_hot_creator(
    address: str, metadata: Any, senders: list[str], gifts_each: int, creator: str, name: str
) -> Result:
    channels = _channels(address, 4)
    stubs = [pb_grpc.WalletServiceStub(c) for c in channels]
    latencies: list[float] = []
    failures = 0

    async def sender(index: int, account: str) -> None:
        nonlocal failures
        stub = stubs[index % 4]
        for k in range(gifts_each):
            started = time.perf_counter()
            try:
                await stub.SendGift(
                    pb.SendGiftRequest(
                        request_id=f"{creator}-{account}-{k}",
                        sender_account_id=account,
                        creator_account_id=creator,
                        gift_id="rose",
                        count=1,
                    ),
                    metadata=metadata,
                    timeout=120,
                )
            except grpc.aio.AioRpcError:
                failures += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(sender(i, s) for i, s in enumerate(senders)))
    seconds = time.perf_counter() - started
    balance = await stubs[0].GetBalance(pb.GetBalanceRequest(account_id=creator), metadata=metadata, timeout=60)
    for channel in channels:
        await channel.close(None)
    landed = len(senders) * gifts_each - failures
    if balance.balance.diamonds != landed:
        raise RuntimeError(f"{name}: creator holds {balance.balance.diamonds} diamonds, {landed} gifts landed")
    p50, p99 = percentiles(latencies)
    return Result(name, landed, seconds, p50, p99, {"senders": str(len(senders)), "failures": str(failures)})


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _bench_memory(address: str, pid: int, metadata: Any, total: int) -> Result:
    senders = [f"mem-{i}" for i in range(200)]
    per_sender = total // len(senders)
    await _fund(address, metadata, senders, per_sender + 1, "mem")
    channels = _channels(address, 4)
    stubs = [pb_grpc.WalletServiceStub(c) for c in channels]
    samples: list[int] = []
    done = 0

    async def sender(index: int, account: str) -> None:
        nonlocal done
        stub = stubs[index % 4]
        for k in range(per_sender):
            await stub.SendGift(
                pb.SendGiftRequest(
                    request_id=f"m-{account}-{k}",
                    sender_account_id=account,
                    creator_account_id=f"mem-star-{k % 10}",
                    gift_id="rose",
                    count=1,
                ),
                metadata=metadata,
                timeout=120,
            )
            done += 1

    async def sampler() -> None:
        step = max(total // 10, 1)
        mark = 0
        while done < per_sender * len(senders):
            if done >= mark:
                samples.append(_rss_kib(pid))
                mark += step
            await asyncio.sleep(0.05)
        samples.append(_rss_kib(pid))

    started = time.perf_counter()
    await asyncio.gather(sampler(), *(sender(i, s) for i, s in enumerate(senders)))
    seconds = time.perf_counter() - started
    for channel in channels:
        await channel.close(None)
    first_tenth = samples[1] if len(samples) > 1 else samples[0]
    return Result(
        "memory over many gifts",
        done,
        seconds,
        notes={
            "rss_start_mib": f"{samples[0] / 1024:.1f}",
            "rss_after_10pct_mib": f"{first_tenth / 1024:.1f}",
            "rss_end_mib": f"{samples[-1] / 1024:.1f}",
            "rss_max_mib": f"{max(samples) / 1024:.1f}",
        },
    )


def run(args: BenchArgs) -> list[Result]:
    credits = 1500 if args.quick else 10000
    senders = 200 if args.quick else 1000
    gifts_each = 3 if args.quick else 5
    memory_gifts = 4000 if args.quick else 1_000_000
    rounds = 1 if args.quick else 3
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp, scratch_postgres(args.admin_database_url) as url:
        state = Path(tmp)
        (state / "catalog.toml").write_text(CATALOG)
        auth.generate_keypair(state / "private.pem", state / "public.pem")
        token = auth.mint_token(auth.load_private_key(state / "private.pem"), "bench", SCOPES, 3600)
        metadata = (("authorization", f"Bearer {token}"),)
        migrate.upgrade("wallet", url)

        echo_port = free_port()
        echo_argv = [sys.executable, "-m", "tests.bench.bench_wallet", "--echo-server", str(echo_port)]
        with _process(echo_argv, {}), _wallet(url, state, window_ms=1.0) as (address, pid):
            asyncio.run(_wait_port(f"127.0.0.1:{echo_port}", health=False))
            asyncio.run(_bench_credit(address, metadata, min(credits, 500), "warm"))
            asyncio.run(_bench_echo(f"127.0.0.1:{echo_port}", metadata, min(credits, 500)))
            # Alternate rounds, so a slow moment of this shared machine hits both sides;
            # the ratio reported for the target is the median over the rounds.
            ratios: list[float] = []
            for round_number in range(1, rounds + 1):
                echo = asyncio.run(_bench_echo(f"127.0.0.1:{echo_port}", metadata, credits))
                credit = asyncio.run(_bench_credit(address, metadata, credits, f"credit{round_number}"))
                ratios.append(credit.per_second / echo.per_second)
                credit.notes["vs_echo"] = f"{ratios[-1]:.0%}"
                results += [echo, credit]
            results[-1].notes[f"median_vs_echo_of_{rounds}"] = f"{statistics.median(ratios):.0%}"

        names = [f"hot-{i}" for i in range(senders)]
        with _wallet(url, state, window_ms=0.0) as (address, _pid):
            asyncio.run(_fund(address, metadata, names, 10 * gifts_each, "fund"))
            naive = asyncio.run(
                _bench_hot_creator(
                    address, metadata, names, gifts_each, "star-naive", "hot creator: one txn per gift (baseline)"
                )
            )
        with _wallet(url, state, window_ms=1.0) as (address, pid):
            grouped = asyncio.run(
                _bench_hot_creator(address, metadata, names, gifts_each, "star-grouped", "hot creator: group commit")
            )
            grouped.notes["vs_baseline"] = f"{grouped.per_second / naive.per_second:.2f}x"
            results += [naive, grouped]
            if "memory" not in args.skip:
                results.append(asyncio.run(_bench_memory(address, pid, metadata, memory_gifts)))
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--echo-server":
        asyncio.run(_echo_server(int(sys.argv[2])))
