"""Waiting for evidence: poll a check until it holds, never sleep-then-assert.

One helper for every suite. ``check`` returns the evidence (any truthy value, which
is returned) or something falsy; it may be a coroutine function. On timeout the
AssertionError names what was awaited and adds ``detail()`` (a log tail, a state
dump), so a failure says what was seen."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

T = TypeVar("T")


def _timed_out(what: str, timeout: float, detail: Callable[[], str] | None) -> AssertionError:
    extra = f"\n{detail()}" if detail is not None else ""
    return AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")


@overload
async def eventually(
    check: Callable[[], Awaitable[T | None]],
    what: str,
    timeout: float = ...,
    *,
    interval: float = ...,
    detail: Callable[[], str] | None = ...,
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T | None],
    what: str,
    timeout: float = ...,
    *,
    interval: float = ...,
    detail: Callable[[], str] | None = ...,
) -> T: ...


async def eventually(
    check: Callable[[], Any],
    what: str,
    timeout: float = 60.0,
    *,
    interval: float = 0.1,
    detail: Callable[[], str] | None = None,
) -> Any:
    """The first truthy value of ``check()`` (awaited when it is a coroutine), polled every
    ``interval`` seconds for at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, detail)
        await asyncio.sleep(interval)


def eventually_sync(
    check: Callable[[], T | None],
    what: str,
    timeout: float = 60.0,
    *,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> T:
    """:func:`eventually` for synchronous tests."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, detail)
        time.sleep(interval)


async def serving(
    address: str,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float = 60.0,
    *,
    detail: Callable[[], str] | None = None,
) -> None:
    """Wait until the gRPC health service at ``address`` answers SERVING; ``process``, if
    given, must not exit meanwhile (its failure is reported at once, with ``detail``)."""
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def up() -> bool:
            if process is not None and process.poll() is not None:
                extra = f"\n{detail()}" if detail is not None else ""
                raise AssertionError(f"{address}: the process exited with status {process.returncode}{extra}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await eventually(up, f"{address} to serve", timeout, detail=detail)
