"""Celery tasks of store notifications: inbox processing and reconciliation.

- ``receipts.notifications.process(id)``: apply one stored notification. The
  webhook sends it once the row is committed; a failure schedules a retry with
  backoff (and the row records when).
- ``receipts.notifications.sweep``: beat, every COINSTORE_NOTIFICATIONS_SWEEP_SECONDS. The embedded broker loses
  unacknowledged messages when a worker dies, and a webhook may have stored a
  row without managing to queue it: the sweeper re-queues every pending row
  older than a grace period and every failed row past its backoff. The row's
  lease and state make any duplicate task a no-op.
- ``receipts.notifications.reconcile``: beat, every COINSTORE_RECONCILE_SECONDS (Google
  voided purchases, Apple notification history; each run resumes the last).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery import Celery

from services.common.celery_app import MAX_COUNTDOWN_SECONDS, PerProcess
from services.common.clock import SystemClock
from services.receipts.config import ReceiptsSettings
from services.receipts.notifications.handle import InboxProcessor
from services.receipts.notifications.reconcile import Reconciler
from services.receipts.notifications.repository import InboxRepository

log = logging.getLogger(__name__)

QUEUE = "receipts"


def task_names(queue: str = QUEUE) -> tuple[str, str, str]:
    """(process, sweep, reconcile): names are prefixed with the queue, so tests can run
    several apps in one process (Celery 5.7 shares a task name's callable between apps)."""
    return f"{queue}.notifications.process", f"{queue}.notifications.sweep", f"{queue}.notifications.reconcile"


PROCESS, SWEEP, RECONCILE = task_names()


@dataclass
class NotificationWorker:
    """What the notification tasks use in one worker process."""

    inbox: InboxRepository
    processor: InboxProcessor
    reconciler: Reconciler


def register(
    app: Celery,
    settings: ReceiptsSettings,
    build_worker: Callable[[], NotificationWorker],
    queue: str = QUEUE,
) -> None:
    """Register this module's tasks and beat entries on the receipts Celery app; each
    worker process builds its :class:`NotificationWorker` with ``build_worker`` on first use."""
    worker = PerProcess(build_worker)
    process_name, sweep_name, reconcile_name = task_names(queue)

    @app.task(name=process_name, bind=True, acks_late=True)  # type: ignore[untyped-decorator]
    def process(self: Any, notification_id: int) -> str:
        outcome, retry_in = worker().processor.process(int(notification_id))
        # A longer wait than the broker can hold a message is the sweeper's: it re-queues rows when due.
        if retry_in is not None and retry_in.total_seconds() <= MAX_COUNTDOWN_SECONDS:
            app.send_task(process_name, args=[notification_id], queue=queue, countdown=retry_in.total_seconds())
        return outcome

    @app.task(name=sweep_name)  # type: ignore[untyped-decorator]
    def sweep() -> int:
        due = worker().inbox.due(SystemClock().now(), timedelta(seconds=settings.notifications_sweep_seconds))
        for notification_id in due:
            app.send_task(process_name, args=[notification_id], queue=queue)
        if due:
            log.info("sweeper re-queued %d notifications", len(due))
        return len(due)

    @app.task(name=reconcile_name)  # type: ignore[untyped-decorator]
    def reconcile() -> list[dict[str, int]]:
        return [{"examined": r.examined, "applied": r.applied} for r in worker().reconciler.run()]

    schedule = dict(app.conf.beat_schedule or {})
    schedule["receipts-notifications-sweep"] = {
        "task": sweep_name,
        "schedule": settings.notifications_sweep_seconds,
        "options": {"queue": queue},
    }
    schedule["receipts-notifications-reconcile"] = {
        "task": reconcile_name,
        "schedule": settings.reconcile_seconds,
        "options": {"queue": queue},
    }
    app.conf.beat_schedule = schedule


def sender(app: Celery, queue: str = QUEUE) -> Callable[[int], None]:
    """What the webhook uses to queue a stored row's processing."""

    process_name = task_names(queue)[0]

    def dispatch(notification_id: int) -> None:
        app.send_task(process_name, args=[notification_id], queue=queue)

    return dispatch
