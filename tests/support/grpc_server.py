"""Run a ServiceHost on a free port inside a test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from google.protobuf.descriptor import FileDescriptor

from services.common.auth import TokenVerifier, load_public_keys
from services.common.db import Database
from services.common.metrics import Metrics
from services.common.server import ServerOptions, ServiceHost


@asynccontextmanager
async def running_host(
    *,
    name: str,
    files: list[FileDescriptor],
    register: Callable[[grpc.aio.Server], None],
    database: Database,
    public_key: Path,
    metrics: Metrics | None = None,
    health_check_seconds: float = 5.0,
    options: ServerOptions | None = None,
) -> AsyncIterator[ServiceHost]:
    host = ServiceHost(
        name=name,
        files=files,
        register=register,
        database=database,
        verifier=TokenVerifier(load_public_keys([public_key])),
        metrics=metrics or Metrics(name),
        bind="127.0.0.1:0",
        grace_seconds=1.0,
        health_check_seconds=health_check_seconds,
        options=options,
    )
    await host.start()
    try:
        yield host
    finally:
        await host.stop()
