"""Shared pieces of the benchmarks: arguments, results, latency statistics,
throwaway PostgreSQL databases."""

from __future__ import annotations

import asyncio
import importlib
import signal
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import redis
import sqlalchemy as sa

from services.common.db import normalize_url


def first_of(name: str, *modules: str) -> Any:
    """``name`` from the first of ``modules`` that exists. The benchmark code also drives a
    baseline tree (``--baseline``), where the receipts modules had older paths."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(f"{name} is in none of {', '.join(modules)}")


@dataclass(frozen=True)
class BenchArgs:
    quick: bool
    admin_database_url: str
    skip: frozenset[str] = frozenset()  # parts a module may leave out (e.g. "memory")
    broker_url: str = ""  # a Redis database the benchmark may empty; "" = the embedded SQLite broker
    concurrency: int = 64  # calls in flight in the end-to-end purchase runs (the targets are at 64)


@dataclass
class Result:
    name: str
    ops: int
    seconds: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        text = f"{self.name:<48} {self.per_second:>10.1f} ops/s  ({self.ops} in {self.seconds:.2f}s)"
        if self.p50_ms is not None and self.p99_ms is not None:
            text += f"  p50 {self.p50_ms:.2f} ms  p99 {self.p99_ms:.2f} ms"
        if self.notes:
            text += "  " + "  ".join(f"{k}={v}" for k, v in self.notes.items())
        return text

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "per_second": self.per_second}


@contextmanager
def scratch_broker(url: str, state: Path) -> Iterator[tuple[str, str]]:
    """A Celery broker URL for a benchmark's services and its name for the results: the
    Redis database ``url`` (emptied afterwards: nothing consumes the messages), or the
    embedded SQLite broker in ``state`` when ``url`` is empty or Redis does not answer."""
    embedded = f"sqla+sqlite:///{state / 'broker.db'}"
    if not url:
        yield embedded, "sqlite"
        return
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as error:
        print(f"(broker {url} unreachable: {error}; using the embedded SQLite broker)", flush=True)
        client.close()
        yield embedded, "sqlite"
        return
    try:
        yield url, "redis"
    finally:
        client.flushdb()
        client.close()


def percentiles(latencies: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    ordered = sorted(latencies)
    if not ordered:
        return 0.0, 0.0
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


@contextmanager
def scratch_postgres(admin_url: str) -> Iterator[str]:
    admin = sa.create_engine(normalize_url(admin_url), isolation_level="AUTOCOMMIT")
    name = f"cs_bench_{uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(normalize_url(admin_url)).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


async def closed_loop(
    call: Callable[..., Awaitable[None]],
    items: list[Any],
    concurrency: int,
    latencies: list[float],
    warmup: int = 8,
) -> float:
    """Warm up with ``warmup`` items, then drive the rest from ``concurrency``
    concurrent callers; returns the elapsed seconds of the measured part."""
    for item in items[:warmup]:
        await call(*item)
    latencies.clear()
    queue = items[warmup:]

    async def worker() -> None:
        while queue:
            await call(*queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


def stop_processes(children: Sequence[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    """SIGTERM every child, then kill the ones that do not stop in time."""
    for child in children:
        child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
