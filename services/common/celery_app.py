"""Celery apps configured for money-moving work.

At-least-once delivery (late acks, requeue when a worker dies, prefetch 1);
every task must therefore be idempotent in the database. The embedded default
broker is kombu's SQLAlchemy transport on SQLite: no server needed, but it
loses unacknowledged messages when a worker is killed, so each service runs a
sweeper that re-queues work its own tables say is unfinished.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from celery import Celery
from sqlalchemy.engine import make_url

T = TypeVar("T")

# Longer than any task runs; Redis/SQS redeliver an unacknowledged task after this.
VISIBILITY_TIMEOUT_SECONDS = 3600
# No countdown or retry delay may approach the visibility timeout (it would run twice).
MAX_COUNTDOWN_SECONDS = 600


def make_celery_app(name: str, broker_url: str) -> Celery:
    embedded = broker_url.startswith(("sqla+", "sqlalchemy+"))
    if embedded:
        database = make_url(broker_url.split("+", 1)[1]).database
        if database:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    app = Celery(name, broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=name,
        task_time_limit=300,
        task_soft_time_limit=240,
        # kombu's SQLAlchemy transport hands its options to create_engine and has no
        # visibility timeout at all; Redis and SQS need one longer than any task.
        broker_transport_options={} if embedded else {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
        timezone="UTC",
    )
    return app


def beat_schedule_file(service: str) -> str:
    """Where celery beat keeps its schedule state, created if missing."""
    path = Path("var") / f"celerybeat-{service}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def retry_countdown(retries: int, base_seconds: float) -> float:
    """Seconds before retry number ``retries + 1``: base·2^retries with jitter (half to
    all of it), never beyond MAX_COUNTDOWN_SECONDS (the broker's visibility timeout)."""
    ceiling = min(float(MAX_COUNTDOWN_SECONDS), base_seconds * 2.0 ** min(retries, 32))
    return random.uniform(0.5, 1.0) * ceiling


class PerProcess(Generic[T]):
    """What a worker process's tasks share (database pools, clients): built on first
    use, so in each prefork child after the fork, then kept."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._value: T | None = None

    def __call__(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value
