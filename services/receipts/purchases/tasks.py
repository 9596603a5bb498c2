"""Celery task of the crediting outbox.

``<queue>.purchases.credit_sweep``: beat, every COINSTORE_CREDIT_SWEEP_SECONDS.
Credits every bound purchase recorded at least COINSTORE_CREDIT_SWEEP_GRACE_SECONDS
ago that no answer of the wallet has marked credited — the receipts service was
killed between recording and crediting or between crediting and marking, or the
wallet was down or killed mid-batch — so a paid purchase is credited within
interval + grace of being recorded, with no client retry. Runs of the task may
overlap (two workers, a slow wallet): the wallet credits each purchase once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from celery import Celery

from services.common.celery_app import PerProcess
from services.common.loop import OnLoop
from services.receipts.config import ReceiptsSettings
from services.receipts.purchases.crediting import Crediting

log = logging.getLogger(__name__)


def task_name(queue: str) -> str:
    return f"{queue}.purchases.credit_sweep"


@dataclass
class CreditSweeper:
    """The sweep of one worker process: the core's crediting on its own event loop."""

    crediting: Crediting
    loop: OnLoop
    grace: timedelta

    def run(self) -> int:
        return self.loop.run(self.crediting.credit_uncredited(self.grace))


def register(app: Celery, settings: ReceiptsSettings, build: Callable[[], CreditSweeper], queue: str) -> None:
    """The sweep task and its beat entry on the receipts Celery app."""
    sweeper = PerProcess(build)
    name = task_name(queue)

    @app.task(name=name)  # type: ignore[untyped-decorator]
    def credit_sweep() -> int:
        credited = sweeper().run()
        if credited:
            log.info("credit sweep: %d recorded purchases credited", credited)
        return credited

    schedule = dict(app.conf.beat_schedule or {})
    schedule["receipts-credit-sweep"] = {
        "task": name,
        "schedule": settings.credit_sweep_seconds,
        "options": {"queue": queue},
    }
    app.conf.beat_schedule = schedule
