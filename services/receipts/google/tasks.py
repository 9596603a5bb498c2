"""Celery tasks of the Google Play path: consume after credit, the unconsumed sweep.

``receipts.google.consume(token)`` consumes a purchase whose credit committed
(the row in ``receipts_google_consumptions`` exists only then). 409
``concurrentUpdate`` and an unavailable or refusing Google are retried with
capped backoff; 400 ``invalidPurchaseState`` re-reads the purchase: already
consumed is success, refunded or cancelled is abandoned (nothing left to
consume). Google refunds anything not acknowledged within 3 days, and the
embedded broker loses messages of a killed worker, so beat runs
``receipts.google.sweep`` which re-queues every credited purchase still
unconsumed after ``COINSTORE_GOOGLE_CONSUME_OVERDUE_SECONDS`` and counts them.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

from celery import Celery, Task

from services.common.celery_app import retry_countdown
from services.common.clock import SystemClock
from services.common.db import Database
from services.receipts.config import ReceiptsSettings
from services.receipts.google.client import PlayClient
from services.receipts.google.consume import Consumer
from services.receipts.google.repository import ConsumptionStore

log = logging.getLogger(__name__)

CONSUME_TASK = "receipts.google.consume"
CONSUME_BATCH_TASK = "receipts.google.consume_batch"
SWEEP_TASK = "receipts.google.sweep"
MAX_RETRIES = 12
BASE_DELAY_SECONDS = 2.0
SWEEP_BATCH = 50


class _Context:
    """Per-process resources, created on first use (after the prefork fork)."""

    def __init__(self, settings: ReceiptsSettings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._consumer: Consumer | None = None

    def consumer(self) -> Consumer:
        with self._lock:
            if self._consumer is None:
                s = self._settings
                database = Database.from_url(s.database_url, 2)
                client = PlayClient(
                    s.google_service_account_file,
                    endpoint=s.google_api_endpoint,
                    timeout_seconds=s.google_api_timeout_seconds,
                    threads=2,
                )
                self._consumer = Consumer(client, ConsumptionStore(database), SystemClock())
            return self._consumer


def register(app: Celery, settings: ReceiptsSettings) -> None:
    """Register this module's tasks and beat entries on the receipts Celery app.

    The overdue count is exported by the receipts service itself
    (coinstore_receipts_google_unconsumed_overdue_now, read from the database);
    prefork worker processes serve no metrics."""
    context = _Context(settings)
    overdue = timedelta(seconds=settings.google_consume_overdue_seconds)
    queue = settings.receipts_queue

    @app.task(name=CONSUME_TASK, bind=True, max_retries=MAX_RETRIES, acks_late=True)
    def consume(self: Task[Any, Any], token: str) -> str:
        outcome = context.consumer().consume(token)
        if outcome.done:
            return outcome.state.value if outcome.state else "missing"
        if self.request.retries >= MAX_RETRIES:
            log.warning("giving up consuming %s… for now (the sweep retries it): %s", token[:12], outcome.note)
            return "retry-later"
        raise self.retry(countdown=retry_countdown(self.request.retries, BASE_DELAY_SECONDS))

    @app.task(name=CONSUME_BATCH_TASK, acks_late=True)
    def consume_batch(tokens: list[str]) -> int:
        """Consume several purchases (one broker message); each one that must wait is retried on its own."""
        consumer = context.consumer()
        retried = 0
        for token in tokens:
            if not consumer.consume(token).done:
                consume.apply_async(args=[token], queue=queue, countdown=retry_countdown(0, BASE_DELAY_SECONDS))
                retried += 1
        return retried

    @app.task(name=SWEEP_TASK, acks_late=True)
    def sweep() -> int:
        consumer = context.consumer()
        tokens = consumer.store.overdue(settings.google_package_name, consumer.clock.now(), overdue)
        if tokens:
            log.warning(
                "%d credited Play purchase(s) still unconsumed after %s; retrying (Google refunds after 3 days)",
                len(tokens),
                overdue,
            )
        for start in range(0, len(tokens), SWEEP_BATCH):
            consume_batch.apply_async(args=[tokens[start : start + SWEEP_BATCH]], queue=queue)
        return len(tokens)

    schedule = dict(app.conf.beat_schedule or {})
    schedule[SWEEP_TASK] = {
        "task": SWEEP_TASK,
        "schedule": settings.google_consume_sweep_seconds,
        "options": {"queue": queue},
    }
    app.conf.beat_schedule = schedule
