"""Processing stored notifications: each type's effect through the receipts
core's exactly-once paths and the REAL wallet (whose ledger says what moved),
once however often or concurrently a row is processed; failures are retried
with backoff and counted; a real Celery worker and the sweeper, on the
embedded broker, Redis and RabbitMQ."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from celery import Celery

from services.common.celery_app import make_celery_app
from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.errors import Unavailable
from services.common.failpoints import Action, FailpointError, Failpoints
from services.common.loop import LoopThread
from services.common.metrics import Metrics
from services.receipts.apple.client import AppStoreApi
from services.receipts.apple.consumption import ConsentRepository, WalletConsumptionFacts
from services.receipts.apple.rules import ApplePolicy
from services.receipts.config import ReceiptsSettings
from services.receipts.google.verify import GooglePurchases
from services.receipts.notifications import tasks as notification_tasks
from services.receipts.notifications.handle import ConsumptionFacts, InboxProcessor, NotificationHandler
from services.receipts.notifications.parse import AppleExpectations, parse_apple, parse_google
from services.receipts.notifications.repository import LEASE, InboxRepository, NewNotification
from services.receipts.notifications.tasks import NotificationWorker
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.model import Environment
from services.receipts.purchases.repository import BindingRepository
from services.receipts.wiring import reconciler
from services.storesim.apple import AppleStore
from services.storesim.pubsub import PubSubPush
from tests.receipts.notifications.apple_payloads import notification, transaction
from tests.receipts.notifications.conftest import PACKAGE, Core, core_verifier
from tests.receipts.notifications.test_webhooks import rtdn
from tests.support.receipts_backends import broker_url, dropped_queue, thread_worker, unique_queue, worker_backends
from tests.support.waiting import eventually_sync

EXPECT = AppleExpectations("com.coinstore.app", 1234567890)
APPLE_PACK = "com.coinstore.coins.350"
GOOGLE_PACK = "coins_70"
AFTER_EFFECT = "receipts.notification.after_effect"


class RecordingAppleApi:
    """The App Store Server API calls the handler makes, recorded instead of sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Environment, dict[str, Any]]] = []

    async def send_consumption_information(
        self, environment: Environment, transaction_id: str, request: Mapping[str, Any]
    ) -> None:
        self.sent.append((transaction_id, environment, dict(request)))


def consumption_facts(db: Database, core: Core) -> WalletConsumptionFacts:
    """Consent from the receipts database, consumption from the real wallet (as wired)."""
    return WalletConsumptionFacts(ConsentRepository(db), core.components.wallet, core.loop)


class NoEffects:
    """The core's use cases for notifications that must move nothing: any call fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} was called; this notification must move nothing")


class Harness:
    def __init__(
        self,
        db: Database,
        apple_store: AppleStore,
        core: Core | None = None,
        *,
        send_consumption: bool = False,
        clock: Clock | None = None,
        failpoints: Failpoints | None = None,
    ) -> None:
        self.db = db
        self.sign = apple_store.sign
        self.inbox = InboxRepository(db)
        self.bindings = BindingRepository(db)
        self.core = core
        self.apple_api = RecordingAppleApi()
        self.metrics = Metrics("receipts-worker")
        self.loop = LoopThread()
        handler = NotificationHandler(
            core.components.crediting if core is not None else cast(Crediting, NoEffects()),
            core.components.google if core is not None else cast(GooglePurchases, NoEffects()),
            ApplePolicy("com.coinstore.app"),
            cast(AppStoreApi, self.apple_api),
            self.bindings,
            core.loop if core is not None else self.loop,
            send_consumption=send_consumption,
            consumption=consumption_facts(db, core) if core is not None else cast(ConsumptionFacts, NoEffects()),
            metrics=self.metrics,
        )
        self.processor = InboxProcessor(self.inbox, handler, self.metrics, clock or SystemClock(), failpoints)
        self.verifier = core_verifier(apple_store)

    def store_apple(self, kind: str, tx: dict[str, Any], uuid_: str | None = None) -> int:
        body = notification(self.sign, kind, self.sign(tx), notification_uuid=uuid_)
        item = parse_apple(json.dumps(body).encode(), self.verifier, EXPECT, self.loop)
        return self.inbox.accept(item, datetime.now(UTC)).id

    def store_google(self, notification_body: dict[str, Any], message_id: str | None = None) -> int:
        envelope = PubSubPush.envelope(notification_body, message_id or uuid.uuid4().hex[:16])
        item = parse_google(json.dumps(envelope).encode(), PACKAGE)
        return self.inbox.accept(item, datetime.now(UTC)).id

    def process(self, row: int) -> str:
        return self.processor.process(row)[0]


@pytest.fixture
def bare(receipts_db: Database, apple_store: AppleStore) -> Iterator[Harness]:
    """For notifications that move nothing: no wallet behind it."""
    harness = Harness(receipts_db, apple_store)
    yield harness
    harness.loop.close()


@pytest.fixture
def harness(receipts_db: Database, apple_store: AppleStore, core: Core) -> Iterator[Harness]:
    """Processing through the receipts core and the real wallet."""
    harness = Harness(receipts_db, apple_store, core)
    yield harness
    harness.loop.close()


def bind(harness: Harness, account_id: str) -> tuple[str, str]:
    """Record the account's binding (as GetPurchaseBinding does): (appAccountToken, obfuscated id)."""
    assert harness.core is not None
    binding = harness.core.components.binding
    token, obfuscated = binding.app_account_token(account_id), binding.obfuscated_account_id(account_id)
    harness.bindings.record_now(account_id, token, obfuscated, datetime.now(UTC))
    return token, obfuscated


def test_apple_types_end_to_end_through_the_wallet(harness: Harness, core: Core) -> None:
    token, _ = bind(harness, "acct-1")
    tx = transaction("3000000001", product_id=APPLE_PACK, app_account_token=token, quantity=2)
    assert harness.process(harness.store_apple("ONE_TIME_CHARGE", tx)) == "credited"
    assert core.balance("acct-1") == 700
    # A transaction without our token is only recorded until the app reports it.
    stranger = transaction("3000000002", product_id=APPLE_PACK, app_account_token=str(uuid.uuid4()))
    assert harness.process(harness.store_apple("ONE_TIME_CHARGE", stranger)) == "recorded"
    assert harness.process(harness.store_apple("CONSUMPTION_REQUEST", tx)) == "recorded"
    assert harness.process(harness.store_apple("REFUND_DECLINED", tx)) == "recorded"
    prorated = {**tx, "revocationType": "REFUND_PRORATED", "revocationPercentage": 50_000, "revocationReason": 1}
    assert harness.process(harness.store_apple("REFUND", prorated)) == "reversed"
    assert core.balance("acct-1") == 350
    # Apple re-sends the (new, full) refund state: state-based, only the difference moves.
    full = {**tx, "revocationType": "REFUND_FULL", "revocationReason": 0}
    assert harness.process(harness.store_apple("REFUND", full)) == "reversed"
    assert core.balance("acct-1") == 0
    assert harness.process(harness.store_apple("REFUND", full)) == "already_reversed"
    assert harness.process(harness.store_apple("REFUND_REVERSED", tx)) == "restored"
    assert harness.process(harness.store_apple("TEST", tx)) == "test"
    assert [coins for _, coins in core.ledger("acct-1")] == [700, -350, -350, 700]
    assert harness.apple_api.sent == []


def test_google_types_end_to_end_through_the_wallet(harness: Harness, core: Core) -> None:
    _, obfuscated = bind(harness, "acct-g")
    token = core.play.buy(GOOGLE_PACK, account_id=obfuscated).token
    other = core.play.buy(GOOGLE_PACK, account_id="someone-else").token
    bought = rtdn("oneTimeProductNotification", token, sku=GOOGLE_PACK)
    assert harness.process(harness.store_google(bought)) == "credited"
    assert core.balance("acct-g") == 70
    assert harness.process(harness.store_google(bought)) == "already_credited"  # a new message, same purchase
    assert harness.process(harness.store_google(rtdn("oneTimeProductNotification", other, sku=GOOGLE_PACK))) == (
        "recorded"
    )
    canceled = rtdn("oneTimeProductNotification", token, sku=GOOGLE_PACK, notificationType=2)
    assert harness.process(harness.store_google(canceled)) == "canceled"
    assert harness.process(harness.store_google(rtdn("testNotification"))) == "test"
    core.play.refund(token)
    assert harness.process(harness.store_google(rtdn("voidedPurchaseNotification", token))) == "reversed"
    assert core.ledger("acct-g") == [(token, 70), (token, -70)]


def test_google_partial_refund_uses_the_cumulative_quantity(harness: Harness, core: Core) -> None:
    _, obfuscated = bind(harness, "acct-p")
    token = core.play.buy(GOOGLE_PACK, account_id=obfuscated, quantity=5).token
    assert harness.process(harness.store_google(rtdn("oneTimeProductNotification", token, sku=GOOGLE_PACK))) == (
        "credited"
    )
    core.play.refund(token, 2)
    partial = rtdn("voidedPurchaseNotification", token, refundType=2)
    assert harness.process(harness.store_google(partial)) == "reversed"
    assert core.balance("acct-p") == 210
    # The same partial refund notified again (new messageId) moves nothing.
    assert harness.process(harness.store_google(partial)) == "already_reversed"
    core.play.refund(token, 1)
    assert harness.process(harness.store_google(partial)) == "reversed"
    assert core.ledger("acct-p") == [(token, 350), (token, -140), (token, -70)]


def credited(harness: Harness, account_id: str, txid: str) -> dict[str, Any]:
    """An App Store purchase credited to ``account_id`` through the core; its transaction payload."""
    token, _ = bind(harness, account_id)
    tx = transaction(txid, product_id=APPLE_PACK, app_account_token=token)
    assert harness.process(harness.store_apple("ONE_TIME_CHARGE", tx)) == "credited"
    return tx


def test_a_row_processed_concurrently_is_applied_once(harness: Harness, core: Core) -> None:
    tx = credited(harness, "acct-c", "3000000009")
    row = harness.store_apple("REFUND", tx)
    barrier = threading.Barrier(10)
    outcomes: list[str] = []

    def worker() -> None:
        barrier.wait()
        outcomes.append(harness.process(row))

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["reversed"] + ["skipped"] * 9
    # The lease lets one claimant through: one call to the core, not ten the wallet absorbs.
    assert core.calls.count(("apply_refund", "3000000009")) == 1
    assert harness.process(row) == "skipped"
    assert harness.inbox.outcome(row)[:2] == ("processed", "reversed")
    assert core.ledger("acct-c") == [("3000000009", 350), ("3000000009", -350)]


def test_a_pending_row_is_swept_after_a_grace_and_not_again_until_another(harness: Harness, core: Core) -> None:
    """A stored row whose task has not run yet: under a backlog, re-queuing it at every
    sweep would pile duplicate messages onto the queue."""
    row = harness.store_apple("REFUND", credited(harness, "acct-p", "3000000011"))
    now, grace = datetime.now(UTC), timedelta(seconds=30)
    assert row not in harness.inbox.due(now, grace)  # its own task may still be on the way
    swept = now + timedelta(seconds=31)
    assert row in harness.inbox.due(swept, grace)
    assert row not in harness.inbox.due(swept + timedelta(seconds=29), grace)
    assert row in harness.inbox.due(swept + timedelta(seconds=31), grace)


def test_failures_are_retried_with_backoff_and_counted(
    harness: Harness, core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    tx = credited(harness, "acct-f", "3000000010")
    row = harness.store_apple("REFUND", tx)
    real_apply_refund = core.components.crediting.apply_refund
    down = Unavailable("WALLET_UNAVAILABLE", "wallet down")
    failures = iter([down, down])

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        error = next(failures, None)
        if error is not None:
            raise error
        return await real_apply_refund(*args, **kwargs)

    monkeypatch.setattr(core.components.crediting, "apply_refund", flaky)
    outcome, delay = harness.processor.process(row)
    assert (outcome, delay) == ("failed", timedelta(seconds=5))
    # Not due yet: the sweeper leaves it alone until its backoff has passed.
    assert row not in harness.inbox.due(datetime.now(UTC), timedelta(seconds=30))
    later = datetime.now(UTC) + timedelta(seconds=6)
    assert row in harness.inbox.due(later, timedelta(seconds=30))
    # Re-queued once: the next sweeps leave it to that task for a grace, then take it again.
    assert row not in harness.inbox.due(later + timedelta(seconds=29), timedelta(seconds=30))
    assert row in harness.inbox.due(later + timedelta(seconds=31), timedelta(seconds=30))
    assert harness.processor.process(row) == ("failed", timedelta(seconds=10))
    assert harness.process(row) == "reversed"
    assert core.balance("acct-f") == 0
    failed = harness.metrics.registry.get_sample_value(
        "coinstore_notification_failures_total", {"source": "apple", "dead": "false"}
    )
    assert failed == 2
    assert harness.inbox.counts() == {"processed": 2}


class MovableClock:
    def __init__(self) -> None:
        self.moment = datetime.now(UTC)

    def now(self) -> datetime:
        return self.moment


def test_a_worker_dying_after_the_effect_is_applied_once_after_its_lease(
    receipts_db: Database, apple_store: AppleStore, core: Core, tmp_path: Path
) -> None:
    clock = MovableClock()
    # An error where a kill would be: the effect is done, the row never finished.
    failpoints = Failpoints({AFTER_EFFECT: Action("error")}, tmp_path / "failpoints")
    harness = Harness(receipts_db, apple_store, core, clock=clock, failpoints=failpoints)
    try:
        token, _ = bind(harness, "acct-d")
        tx = transaction("3000000011", product_id=APPLE_PACK, app_account_token=token)
        row = harness.store_apple("ONE_TIME_CHARGE", tx)
        with pytest.raises(FailpointError):
            harness.processor.process(row)
        assert core.ledger("acct-d") == [("3000000011", 350)]
        assert harness.inbox.outcome(row)[0] == "pending"
        # Leased to the dead worker: no one takes it until the lease runs out.
        assert harness.process(row) == "skipped"
        assert row not in harness.inbox.due(clock.now(), timedelta(seconds=1))
        clock.moment += LEASE + timedelta(seconds=1)
        assert row in harness.inbox.due(clock.now(), timedelta(seconds=1))
        # The same notification asks the wallet with the same request: it replays its answer, moving nothing.
        assert harness.process(row) == "credited"
        assert harness.inbox.outcome(row)[:2] == ("processed", "credited")
        assert core.ledger("acct-d") == [("3000000011", 350)]
    finally:
        harness.loop.close()


@worker_backends
@pytest.mark.timeout(120)
def test_real_worker_processes_and_sweeper_requeues_lost_tasks(
    harness: Harness, core: Core, broker_kind: str, tmp_path: Path
) -> None:
    broker = broker_url(broker_kind, tmp_path)
    with dropped_queue(broker, unique_queue()) as queue:
        app = make_celery_app(queue, broker)
        notification_worker(app, harness, core, queue, sweep_seconds=0.0)
        txids = [f"31000000{i}" for i in range(3)]
        refunds = [harness.store_apple("REFUND", credited(harness, f"acct-w{i}", t)) for i, t in enumerate(txids)]
        queued, lost = refunds[0], refunds[1:]
        dispatch = notification_tasks.sender(app, queue)

        def processed(rows: list[int]) -> bool:
            return all(harness.inbox.outcome(r)[0] == "processed" for r in rows)

        with thread_worker(app, queue):
            dispatch(queued)  # the other two rows' tasks were "lost": only the sweeper can find them
            eventually_sync(lambda: processed([queued]), "the worker to process the queued row", 60)
            # The worker has run the one task it was sent, and only that one.
            assert [harness.inbox.outcome(r)[0] for r in lost] == ["pending", "pending"]
            app.send_task(notification_tasks.task_names(queue)[1], queue=queue)
            eventually_sync(lambda: processed(lost), "the sweeper's tasks to process the lost rows", 60)
    for i, txid in enumerate(txids):
        assert core.ledger(f"acct-w{i}") == [(txid, 350), (txid, -350)]
    assert sorted(c for c in core.calls if c[0] == "apply_refund") == [("apply_refund", t) for t in txids]


def notification_worker(app: Celery, harness: Harness, core: Core, queue: str, *, sweep_seconds: float) -> None:
    """Register the notification tasks on ``app``, running through ``harness``'s processor."""
    settings = ReceiptsSettings(database_url="sqlite://", notifications_sweep_seconds=sweep_seconds)  # type: ignore[call-arg]
    worker = NotificationWorker(harness.inbox, harness.processor, reconciler(core.settings, core.components, core.loop))
    notification_tasks.register(app, settings, lambda: worker, queue)


def test_new_notification_fields_are_kept(bare: Harness) -> None:
    row = bare.store_google(rtdn("voidedPurchaseNotification", "tok-keep", futureField="x"))
    stored = bare.inbox.claim(row, datetime.now(UTC))
    assert stored is not None
    assert stored.payload["notification"]["voidedPurchaseNotification"]["futureField"] == "x"


def test_unused_new_notification(bare: Harness) -> None:
    item = NewNotification("google", "m-unknown", "unknown", None, None, "{}", {"notification": {}})
    row = bare.inbox.accept(item, datetime.now(UTC)).id
    assert bare.processor.process(row)[0] == "ignored"
