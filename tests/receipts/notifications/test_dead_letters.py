"""Dead letters with a policy: a refund notification that keeps failing is retried,
slowly, for at least seven days before it goes ``dead``, keeping every attempt's
error; once the fault clears it applies once. A dead one is replayed by
`coinstore receipts notifications replay` (a real process) and applied by a real
worker on a real broker. What moved is read from the real wallet's ledger."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from services.common.celery_app import make_celery_app
from services.common.db import Database
from services.common.errors import Unavailable
from services.receipts.config import ReceiptsSettings
from services.receipts.notifications.repository import DEAD, FAILED
from services.receipts.wiring import inbox
from services.storesim.apple import AppleStore
from tests.receipts.notifications.conftest import Core
from tests.receipts.notifications.test_handle import (
    Harness,
    MovableClock,
    credited,
    notification_worker,
)
from tests.support.receipts_backends import broker_url, dropped_queue, thread_worker, unique_queue, worker_backends
from tests.support.waiting import eventually_sync

REPO = Path(__file__).resolve().parents[3]


class WalletDown:
    """apply_refund fails as while the wallet is unreachable, until ``up``; then the real one runs."""

    def __init__(self, core: Core) -> None:
        self.real = core.components.crediting.apply_refund
        self.up = False
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if not self.up:
            raise Unavailable("WALLET_UNAVAILABLE", f"wallet down (call {self.calls})")
        return await self.real(*args, **kwargs)


def fail_until(harness: Harness, clock: MovableClock, row: int, until: timedelta) -> int:
    """Process ``row`` whenever it is due, as the sweeper would, for ``until`` of clock time."""
    end = clock.moment + until
    attempts = 0
    while clock.moment < end:
        outcome, delay = harness.processor.process(row)
        assert outcome == "failed"
        attempts += 1
        if delay is None:
            assert harness.inbox.outcome(row)[0] == DEAD
            break
        # Due at its backoff, not before.
        clock.moment += delay - timedelta(seconds=1)
        assert row not in harness.inbox.due(clock.moment, timedelta(seconds=30))
        clock.moment += timedelta(seconds=1)
        assert row in harness.inbox.due(clock.moment, timedelta(seconds=30))
    return attempts


@pytest.fixture
def slow(receipts_db: Database, apple_store: AppleStore, core: Core) -> Iterator[tuple[Harness, MovableClock]]:
    clock = MovableClock()
    harness = Harness(receipts_db, apple_store, core, clock=clock)
    # The inbox with the policy the settings give (7 days, one hour apart at most).
    harness.inbox = inbox(core.settings, receipts_db)
    harness.processor._inbox = harness.inbox
    yield harness, clock
    harness.loop.close()


def failing_refund(harness: Harness, core: Core, monkeypatch: pytest.MonkeyPatch, txid: str) -> tuple[int, WalletDown]:
    """A stored REFUND of a credited purchase, while the wallet is down: (its row, the outage)."""
    row = harness.store_apple("REFUND", credited(harness, f"fan-{txid}", txid))
    down = WalletDown(core)
    monkeypatch.setattr(core.components.crediting, "apply_refund", down)
    return row, down


def test_a_refund_failing_for_a_day_keeps_retrying_and_applies_once(
    slow: tuple[Harness, MovableClock], core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness, clock = slow
    row, down = failing_refund(harness, core, monkeypatch, "3300000001")
    attempts = fail_until(harness, clock, row, timedelta(days=1))
    # Far more than the old 25 attempts, and not dead.
    assert attempts > 25
    assert harness.inbox.outcome(row)[0] == FAILED
    errors = harness.inbox.attempt_errors(row)
    assert [e["attempt"] for e in errors] == list(range(1, attempts + 1))
    assert all("wallet down" in e["error"] for e in errors)
    # Slowly: at most an hour between attempts once backed off.
    assert harness.inbox.policy.refunds.backoff(attempts) == timedelta(hours=1)
    down.up = True
    assert harness.process(row) == "reversed"
    assert harness.process(row) == "skipped"
    assert core.ledger("fan-3300000001") == [("3300000001", 350), ("3300000001", -350)]


def test_a_refund_goes_dead_only_after_seven_days(
    slow: tuple[Harness, MovableClock], core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness, clock = slow
    row, _ = failing_refund(harness, core, monkeypatch, "3300000002")
    fail_until(harness, clock, row, timedelta(days=6, hours=23))
    assert harness.inbox.outcome(row)[0] == FAILED
    fail_until(harness, clock, row, timedelta(days=1))
    assert harness.inbox.outcome(row)[0] == DEAD
    assert len(harness.inbox.attempt_errors(row)) > 7 * 24


def _cli_environment(settings: ReceiptsSettings, broker: str, queue: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'gen'}",
        "COINSTORE_DATABASE_URL": settings.database_url,
        "COINSTORE_BROKER_URL": broker,
        "COINSTORE_RECEIPTS_QUEUE": queue,
        "COINSTORE_LOG_FORMAT": "text",
    }


@worker_backends
@pytest.mark.timeout(180)
def test_a_dead_refund_is_replayed_by_the_cli_and_applied_by_the_worker(
    slow: tuple[Harness, MovableClock],
    core: Core,
    broker_kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    harness, clock = slow
    broker = broker_url(broker_kind, tmp_path)
    row, down = failing_refund(harness, core, monkeypatch, "3300000003")
    fail_until(harness, clock, row, timedelta(days=8))
    assert harness.inbox.outcome(row)[0] == DEAD
    # Nothing picks a dead row up on its own.
    assert row not in harness.inbox.due(clock.moment + timedelta(days=30), timedelta(seconds=1))
    down.up = True
    with dropped_queue(broker, unique_queue()) as queue:
        app = make_celery_app(queue, broker)
        notification_worker(app, harness, core, queue, sweep_seconds=3600.0)
        with thread_worker(app, queue):
            replay = subprocess.run(
                [sys.executable, "-m", "services.cli", "receipts", "notifications", "replay", "--id", str(row)],
                env=_cli_environment(core.settings, broker, queue),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert replay.returncode == 0, replay.stderr
            assert f"replayed 1 dead notification(s): {row}" in replay.stdout
            eventually_sync(lambda: harness.inbox.outcome(row)[0] == "processed", "the replayed row", 60)
    assert harness.inbox.outcome(row)[:2] == ("processed", "reversed")
    assert core.ledger("fan-3300000003") == [("3300000003", 350), ("3300000003", -350)]
    # The attempts before it died are still on the row.
    assert len(harness.inbox.attempt_errors(row)) > 7 * 24
