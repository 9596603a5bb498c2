"""The consume decisions (Consumer) and the overdue sweep query, against the Play
simulator and a migrated database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.common import migrate
from services.common.celery_app import MAX_COUNTDOWN_SECONDS, retry_countdown
from services.common.clock import SystemClock
from services.common.db import Database
from services.receipts.google.client import PlayClient
from services.receipts.google.consume import Consumer
from services.receipts.google.repository import ConsumeState, ConsumptionRepository, CreditedPlayPurchase
from services.storesim.google import Fault, PlayState
from tests.receipts.google.support import PACKAGE, play_simulator_thread


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[tuple[Consumer, PlayState]]:
    migrate.upgrade("receipts", database_url)
    database = Database.from_url(database_url, 2)
    with play_simulator_thread(tmp_path) as (play, base):
        client = PlayClient(play.service_account_path, endpoint=base + "/", timeout_seconds=2, backoff_seconds=0.01)
        yield Consumer(client, ConsumptionRepository(database), SystemClock()), play
        client.close()
    database.close()


def credited(consumer: Consumer, play: PlayState, **kwargs: object) -> str:
    token = play.buy("coins_70", **kwargs).token  # type: ignore[arg-type]
    assert consumer.consumptions.add(token, PACKAGE, "coins_70", datetime.now(UTC))
    assert not consumer.consumptions.add(token, PACKAGE, "coins_70", datetime.now(UTC))
    return token


def state_of(consumer: Consumer, token: str) -> ConsumeState:
    row = consumer.consumptions.get(token)
    assert row is not None
    return row.state


def test_consumes_once(world: tuple[Consumer, PlayState]) -> None:
    consumer, play = world
    token = credited(consumer, play)
    outcome = consumer.consume(token)
    assert (outcome.done, outcome.state) == (True, ConsumeState.CONSUMED)
    purchase = play.get(token)
    assert purchase is not None
    assert (purchase.consumed, purchase.acknowledged, purchase.consume_calls) == (True, True, 1)
    # A duplicate delivery of the task does nothing.
    assert consumer.consume(token).done
    assert purchase.consume_calls == 1


def test_conflict_is_retried(world: tuple[Consumer, PlayState]) -> None:
    consumer, play = world
    token = credited(consumer, play)
    play.inject(Fault("consume", 409, 1))
    first = consumer.consume(token)
    assert not first.done
    assert "409" in first.note
    row = consumer.consumptions.get(token)
    assert row is not None
    assert (row.state, row.attempts) == (ConsumeState.UNCONSUMED, 1)
    assert consumer.consume(token).state is ConsumeState.CONSUMED


def test_already_consumed_elsewhere_is_success(world: tuple[Consumer, PlayState]) -> None:
    consumer, play = world
    token = credited(consumer, play)
    play.consume(PACKAGE, "coins_70", token)
    outcome = consumer.consume(token)
    assert (outcome.done, outcome.state, outcome.note) == (True, ConsumeState.CONSUMED, "already consumed")


def test_refunded_before_consumption_is_abandoned(world: tuple[Consumer, PlayState]) -> None:
    consumer, play = world
    token = credited(consumer, play)
    play.refund(token)
    assert consumer.consume(token).state is ConsumeState.ABANDONED
    expired = credited(consumer, play)
    play.expire(expired)
    assert consumer.consume(expired).state is ConsumeState.ABANDONED


def test_unavailable_google_is_retried(world: tuple[Consumer, PlayState]) -> None:
    consumer, play = world
    token = credited(consumer, play)
    play.inject(Fault("consume", 503, 10))
    outcome = consumer.consume(token)
    assert not outcome.done
    assert "STORE_UNAVAILABLE" in outcome.note
    play.clear_faults()
    assert consumer.consume(token).state is ConsumeState.CONSUMED


def test_retry_delays_never_exceed_the_countdown_cap() -> None:
    delays = [retry_countdown(n, 2.0) for n in range(40)]
    assert all(0 < d <= MAX_COUNTDOWN_SECONDS for d in delays)
    assert delays[0] < delays[5]


def test_overdue_finds_old_unconsumed_rows_and_adopts_orphans(world: tuple[Consumer, PlayState]) -> None:
    consumer, play = world
    consumptions = consumer.consumptions
    now = datetime.now(UTC)
    old = play.buy("coins_70").token
    consumptions.add(old, PACKAGE, "coins_70", now - timedelta(hours=2))
    fresh = play.buy("coins_70").token
    consumptions.add(fresh, PACKAGE, "coins_70", now)
    done = play.buy("coins_70").token
    consumptions.add(done, PACKAGE, "coins_70", now - timedelta(hours=2))
    consumptions.finish(done, ConsumeState.CONSUMED, now)
    # Credited (the wallet lists it) but the consumption row was never written.
    orphan = play.buy("coins_350").token
    credited = [CreditedPlayPurchase(orphan, "coins_350", now - timedelta(hours=3))]
    found = consumptions.overdue(PACKAGE, now, timedelta(hours=1), credited)
    assert sorted(found) == sorted([old, orphan])
    assert consumptions.count_overdue(now, timedelta(hours=1)) == 2
    adopted = consumptions.get(orphan)
    assert adopted is not None
    assert (adopted.product_id, adopted.state) == ("coins_350", ConsumeState.UNCONSUMED)
    assert consumer.consume(orphan).state is ConsumeState.CONSUMED


def test_overdue_gauge_counts_from_the_database(world: tuple[Consumer, PlayState]) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from services.receipts.google.consume import OverdueCollector

    consumer, play = world
    registry = CollectorRegistry()
    registry.register(OverdueCollector(consumer.consumptions, SystemClock(), timedelta(hours=1)))
    name = b"coinstore_receipts_google_unconsumed_overdue_now"
    assert name + b" 0.0" in generate_latest(registry)
    consumer.consumptions.add(play.buy("coins_70").token, PACKAGE, "coins_70", datetime.now(UTC) - timedelta(hours=2))
    consumer.consumptions.add(play.buy("coins_70").token, PACKAGE, "coins_70", datetime.now(UTC))
    assert name + b" 1.0" in generate_latest(registry)
