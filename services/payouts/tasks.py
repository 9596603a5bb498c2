"""The payout batch pipeline as Celery tasks (names are the contract; bodies live in domain.pipeline).

acks_late + reject-on-worker-lost + prefetch 1 come from services.common.celery_app;
every body is idempotent in the database, so redelivery is harmless. Provider
errors retry with capped exponential backoff (never beyond MAX_COUNTDOWN_SECONDS);
what exhausts its retries, or whose message a killed worker lost, the sweeper
re-queues from the tables.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.schedules import crontab

from coinstore.payouts.v1 import payout_service_pb2 as pb
from services.common.catalog import load_catalog
from services.common.celery_app import retry_countdown
from services.common.clock import SystemClock
from services.common.db import Database
from services.payouts import convert
from services.payouts.config import PayoutsSettings
from services.payouts.domain.pipeline import Pipeline
from services.payouts.domain.ports import ProviderUnavailable
from services.payouts.domain.service import Payouts
from services.payouts.errors import FailedPrecondition, Unavailable
from services.payouts.store import RequestKey
from services.payouts.wiring import CeleryQueue, build_domain

log = logging.getLogger(__name__)

MAX_RETRIES = 8
RETRY_BASE_SECONDS = 1.0


@dataclass
class _Context:
    pid: int
    database: Database
    payouts: Payouts
    pipeline: Pipeline


class ProcessContext:
    """Database, wallet channel and HTTP client are made per worker process, after the fork."""

    def __init__(self, settings: PayoutsSettings, app: Celery) -> None:
        self._settings = settings
        self._app = app
        self._lock = threading.Lock()
        self._context: _Context | None = None

    def get(self) -> _Context:
        with self._lock:
            if self._context is None or self._context.pid != os.getpid():
                settings = self._settings
                database = Database.from_url(settings.database_url, settings.payout_settle_concurrency + 2)
                payouts, pipeline = build_domain(
                    settings,
                    database,
                    load_catalog(settings.catalog),
                    CeleryQueue(self._app, settings.payout_queue),
                    SystemClock(),
                    failpoints=settings.failpoint_set(),
                )
                self._context = _Context(os.getpid(), database, payouts, pipeline)
            return self._context


def daily_request(day: datetime) -> pb.CreatePayoutBatchRequest:
    return pb.CreatePayoutBatchRequest(request_id=f"daily-{day.date().isoformat()}")


def register(app: Celery, settings: PayoutsSettings) -> None:
    context = ProcessContext(settings, app)
    retryable = (ProviderUnavailable, Unavailable)

    @app.task(name="payouts.plan_batch", bind=True, max_retries=MAX_RETRIES)
    def plan_batch(self: Any, batch_id: str) -> None:
        try:
            context.get().pipeline.plan_batch(batch_id)
        except retryable as exc:
            raise self.retry(exc=exc, countdown=retry_countdown(self.request.retries, RETRY_BASE_SECONDS)) from None

    @app.task(name="payouts.submit_chunk", bind=True, max_retries=MAX_RETRIES)
    def submit_chunk(self: Any, chunk_id: str) -> None:
        try:
            context.get().pipeline.submit_chunk(chunk_id)
        except retryable as exc:
            log.warning("submission %s: %s (retry %d)", chunk_id, exc, self.request.retries + 1)
            raise self.retry(exc=exc, countdown=retry_countdown(self.request.retries, RETRY_BASE_SECONDS)) from None

    @app.task(name="payouts.poll_chunk", bind=True, max_retries=MAX_RETRIES)
    def poll_chunk(self: Any, chunk_id: str) -> None:
        try:
            context.get().pipeline.poll_chunk(chunk_id)
        except retryable as exc:
            log.warning("polling %s: %s (retry %d)", chunk_id, exc, self.request.retries + 1)
            raise self.retry(exc=exc, countdown=retry_countdown(self.request.retries, RETRY_BASE_SECONDS)) from None

    @app.task(name="payouts.sweep")
    def sweep() -> None:
        context.get().payouts.sweep()

    @app.task(name="payouts.daily_batch")
    def daily_batch() -> str:
        # Everything requested until now; the request id makes it one batch per UTC day.
        request = daily_request(datetime.now(UTC))
        key = RequestKey(
            "CreatePayoutBatch",
            request.request_id,
            request,
            lambda b: pb.CreatePayoutBatchResponse(batch=convert.batch(b)),
        )
        try:
            _raw, batch_id = context.get().payouts.create_batch(key, "", None, 0)
        except FailedPrecondition as refusal:
            log.info("daily payout batch: %s", refusal.message)
            return ""
        log.info("daily payout batch %s created", batch_id)
        return batch_id

    schedule: dict[str, dict[str, Any]] = {
        "payouts-sweep": {
            "task": "payouts.sweep",
            "schedule": settings.payout_sweep_seconds,
            "options": {"queue": settings.payout_queue, "expires": settings.payout_sweep_seconds},
        }
    }
    if settings.payout_daily_batch_hour >= 0:
        schedule["payouts-daily-batch"] = {
            "task": "payouts.daily_batch",
            "schedule": crontab(minute=0, hour=settings.payout_daily_batch_hour),
            "options": {"queue": settings.payout_queue},
        }
    app.conf.beat_schedule = schedule
