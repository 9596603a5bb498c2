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
import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from celery import Celery, Task

from services.common.celery_app import PerProcess, make_celery_app, retry_countdown
from services.receipts.config import ReceiptsSettings
from services.receipts.google.consume import Consumer
from services.receipts.google.repository import CreditedPlayPurchase

log = logging.getLogger(__name__)

CONSUME_TASK = "receipts.google.consume"
CONSUME_BATCH_TASK = "receipts.google.consume_batch"
SWEEP_TASK = "receipts.google.sweep"
MAX_RETRIES = 12
BASE_DELAY_SECONDS = 2.0
SWEEP_BATCH = 50


# The sweep asks the wallet for the Play purchases credited this far back (Google refunds
# a purchase not acknowledged within 3 days; an unconsumed one also blocks buying it again).
CREDITED_LOOKBACK = timedelta(days=7)

CreditedPlay = Callable[[datetime, datetime], list[CreditedPlayPurchase]]


def register(
    app: Celery,
    settings: ReceiptsSettings,
    build_consumer: Callable[[], Consumer],
    build_credited_play: Callable[[], CreditedPlay] | None = None,
) -> None:
    """Register this module's tasks and beat entries on the receipts Celery app; each
    worker process builds its Consumer with ``build_consumer`` on first use.

    The overdue count is exported by the receipts service itself
    (coinstore_receipts_google_unconsumed_overdue_now, read from the database);
    prefork worker processes serve no metrics."""
    consumer = PerProcess(build_consumer)
    credited_play = PerProcess(build_credited_play) if build_credited_play is not None else None
    overdue = timedelta(seconds=settings.google_consume_overdue_seconds)
    queue = settings.receipts_queue

    @app.task(name=CONSUME_TASK, bind=True, max_retries=MAX_RETRIES, acks_late=True)
    def consume(self: Task[Any, Any], token: str) -> str:
        outcome = consumer().consume(token)
        if outcome.done:
            return outcome.state.value if outcome.state else "missing"
        if self.request.retries >= MAX_RETRIES:
            log.warning("giving up consuming %s… for now (the sweep retries it): %s", token[:12], outcome.note)
            return "retry-later"
        raise self.retry(countdown=retry_countdown(self.request.retries, BASE_DELAY_SECONDS))

    @app.task(name=CONSUME_BATCH_TASK, acks_late=True)
    def consume_batch(tokens: list[str]) -> int:
        """Consume several purchases (one broker message); each one that must wait is retried on its own."""
        consume_one = consumer()
        retried = 0
        for token in tokens:
            if not consume_one.consume(token).done:
                consume.apply_async(args=[token], queue=queue, countdown=retry_countdown(0, BASE_DELAY_SECONDS))
                retried += 1
        return retried

    @app.task(name=SWEEP_TASK, acks_late=True)
    def sweep() -> int:
        sweeper = consumer()
        now = sweeper.clock.now()
        credited: list[CreditedPlayPurchase] = []
        if credited_play is not None:
            try:
                credited = credited_play()(now - CREDITED_LOOKBACK, now - overdue)
            except Exception as error:
                # The receipts rows are still swept; the wallet's side waits for the next sweep.
                log.warning("could not list the wallet's credited Play purchases (next sweep): %s", error)
        tokens = sweeper.consumptions.overdue(settings.google_package_name, now, overdue, credited)
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


class BackgroundEnqueuer:
    """Hands consume tasks to the broker from one background thread.

    The RPC only puts the token on a bounded in-memory queue: a slow broker
    (the embedded SQLite one takes tens of milliseconds per message) never adds
    to a verification's latency. The durable record is the database row, so a
    token dropped here (queue full, broker down, process killed) is consumed by
    the sweep instead. Tokens arriving within ``linger_seconds`` of the first go
    in one message: each message costs the broker client milliseconds of CPU (about
    1.4 ms on the embedded broker). At 0.05 s the messages were 4 % of the receipts
    process's CPU per Play purchase at ~520 purchases/s; at 0.2 s, most messages are
    full batches. A consume that waits 0.2 s longer changes nothing a buyer sees:
    the coins were credited when the purchase was verified, and Play allows days.
    """

    def __init__(
        self,
        send: Callable[[list[str]], None],
        capacity: int = 10_000,
        batch: int = 100,
        linger_seconds: float = 0.2,
    ) -> None:
        self._send = send
        self._batch = batch
        self._linger = linger_seconds
        self._queue: queue.Queue[str | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="play-consume-enqueuer", daemon=True)
        self._thread.start()

    def __call__(self, token: str) -> None:
        try:
            self._queue.put_nowait(token)
        except queue.Full:
            log.warning("the consume queue is full; the sweep will consume this Play purchase")

    def _run(self) -> None:
        stopping = False
        while not stopping:
            tokens: list[str] = []
            item = self._queue.get()
            deadline = time.monotonic() + self._linger
            while item is not None:
                tokens.append(item)
                if len(tokens) >= self._batch:
                    break
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            stopping = item is None
            if not tokens:
                continue
            try:
                self._send(tokens)
            except Exception as exc:
                log.warning("could not queue %d Play consume(s) (the sweep will retry): %s", len(tokens), exc)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to ``timeout``), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


def celery_sender(broker_url: str, queue: str) -> Callable[[list[str]], None]:
    """Send consume work to the receipts worker, one message per batch (blocking)."""
    app = make_celery_app(queue, broker_url)

    def send(tokens: list[str]) -> None:
        if len(tokens) == 1:
            app.send_task(CONSUME_TASK, args=[tokens[0]], queue=queue)
        else:
            app.send_task(CONSUME_BATCH_TASK, args=[tokens], queue=queue)

    return send
