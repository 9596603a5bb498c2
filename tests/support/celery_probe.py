"""A Celery app with one task that records its argument in a file, used to prove a
real worker consumes from each broker; and an in-thread worker for such apps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker

from services.common.celery_app import make_celery_app


def create_probe_app(broker_url: str, queue: str) -> Celery:
    app = make_celery_app(queue, broker_url)

    @app.task(name="probe.record")
    def record(path: str, value: str) -> None:
        with Path(path).open("a") as handle:
            handle.write(value + "\n")

    return app


@contextmanager
def thread_worker(app: Celery, queue: str) -> Iterator[None]:
    """A solo Celery worker consuming ``queue`` in a thread of this process.

    Without AMQP heartbeats: with their timer scheduled, the worker's event loop
    polls up to 10 s at a time and notices it should stop only then (every
    in-thread RabbitMQ test would pay 10-20 s, and a slow stop fails the test).
    A test's connection is never idle long enough to need them."""
    app.conf.broker_heartbeat = 0
    with start_worker(app, pool="solo", perform_ping_check=False, queues=[queue], loglevel="WARNING"):
        yield
