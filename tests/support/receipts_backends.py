"""The database and broker pairs the receipts workers' tests run on, and a
Celery worker in a thread of the test process.

SQLite with the embedded broker (what `make run` uses), and PostgreSQL with
each real broker, Redis and RabbitMQ (what production uses). Apply
``worker_backends`` to a test taking ``database_url`` and ``broker_kind``; it
overrides the ``database_url`` fixture's own parameters. The real-broker cases
are skipped locally when a broker is missing and fail in CI
(tests/support/env.py). Every test takes its own queue (``unique_queue``), so
tests running in parallel on one broker never take each other's tasks, and
drops it afterwards (``dropped_queue``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from tests.support import env

SERVER = (pytest.mark.postgres, pytest.mark.broker)

worker_backends = pytest.mark.parametrize(
    ("database_url", "broker_kind"),
    [
        pytest.param("sqlite", "embedded", id="sqlite-embedded"),
        pytest.param("postgres", "redis", marks=SERVER, id="postgres-redis"),
        pytest.param("postgres", "rabbitmq", marks=SERVER, id="postgres-rabbitmq"),
    ],
    indirect=["database_url"],
)


def broker_url(kind: str, tmp_path: Path) -> str:
    """The URL of broker ``kind``: the embedded one in ``tmp_path``, or the configured server."""
    if kind == "embedded":
        return f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    return env.server_broker_url(kind)


def unique_queue(prefix: str = "receipts") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@contextmanager
def dropped_queue(url: str, queue: str) -> Iterator[str]:
    """Yields ``queue``; afterwards deletes it from a server broker (with what is left in it)."""
    try:
        yield queue
    finally:
        if not url.startswith("sqla+"):
            from kombu.connection import Connection

            with suppress(Exception), Connection(url, connect_timeout=3) as conn:
                conn.default_channel.queue_delete(queue)


@contextmanager
def thread_worker(app: Celery, queue: str) -> Iterator[None]:
    """A solo Celery worker consuming ``queue`` in a thread of this process.

    Without AMQP heartbeats: with their timer scheduled, the worker's event loop
    polls up to 10 s at a time and notices it should stop only then (every
    in-thread RabbitMQ test would pay 10-20 s). A test's connection is never
    idle long enough to need them."""
    app.conf.broker_heartbeat = 0
    with start_worker(app, pool="solo", perform_ping_check=False, queues=[queue], loglevel="WARNING"):
        yield
