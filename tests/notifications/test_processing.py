"""Processing stored notifications: each type's effect through the exactly-once
port, once however often or concurrently a row is processed; failures are
retried with backoff and counted; a real Celery worker and the sweeper."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker

from services.common.celery_app import make_celery_app
from services.common.clock import SystemClock
from services.common.db import Database
from services.common.metrics import Metrics
from services.receipts import tasks_notifications
from services.receipts.config import ReceiptsSettings
from services.receipts.notifications import wiring
from services.receipts.notifications.core import LoopThread
from services.receipts.notifications.parse import AppleExpectations, parse_apple, parse_google
from services.receipts.notifications.ports import StoreUnavailable
from services.receipts.notifications.processor import Handlers, InboxProcessor, NotificationHandler
from services.receipts.notifications.store import BindingStore, InboxStore, NewNotification
from services.storesim.apple import AppleStore
from services.storesim.pubsub import PubSubPush
from tests.notifications.apple_payloads import notification, transaction
from tests.notifications.conftest import PACKAGE, FakeLedger, core_verifier
from tests.notifications.test_webhook import rtdn

EXPECT = AppleExpectations("com.coinstore.app", 1234567890, ("Production", "Sandbox"))


class FakePlay:
    def __init__(self) -> None:
        self.purchases: dict[str, dict[str, Any]] = {}

    def get_product_purchase_v2(self, package_name: str, purchase_token: str) -> Mapping[str, Any]:
        return self.purchases[purchase_token]

    def list_voided_purchases(
        self, package_name: str, start_time_ms: int, end_time_ms: int, page_token: str | None
    ) -> Mapping[str, Any]:
        raise NotImplementedError


class RecordingAppleApi:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def send_consumption_information(self, transaction_id: str, environment: str, body: Mapping[str, Any]) -> None:
        self.sent.append((transaction_id, environment, dict(body)))

    def get_refund_history(self, transaction_id: str, environment: str, revision: str | None) -> Mapping[str, Any]:
        raise NotImplementedError


class Facts:
    def consumption(self, store_transaction_id: str) -> tuple[str, int]:
        return "DELIVERED", 25_000


class Harness:
    def __init__(self, db: Database, apple_store: AppleStore, *, send_consumption: bool = False) -> None:
        self.db = db
        self.sign = apple_store.sign
        self.inbox = InboxStore(db)
        self.bindings = BindingStore(db)
        self.ledger = FakeLedger()
        self.play = FakePlay()
        self.apple_api = RecordingAppleApi()
        self.metrics = Metrics("receipts-worker")
        handler = NotificationHandler(
            Handlers(
                actions=self.ledger,
                accounts=self.bindings,
                apple_api=self.apple_api,
                play=self.play,
                package_name=PACKAGE,
                send_consumption=send_consumption,
                consumption=Facts(),
            )
        )
        self.processor = InboxProcessor(self.inbox, handler, self.metrics, SystemClock())
        self.loop = LoopThread()
        self.verifier = core_verifier(apple_store, self.loop.loop)

    def store_apple(self, kind: str, tx: dict[str, Any], uuid_: str | None = None) -> int:
        body = notification(self.sign, kind, self.sign(tx), notification_uuid=uuid_)
        item = parse_apple(json.dumps(body).encode(), self.verifier, EXPECT)
        return self.inbox.accept(item, datetime.now(UTC)).id

    def store_google(self, notification_body: dict[str, Any], message_id: str | None = None) -> int:
        envelope = PubSubPush.envelope(notification_body, message_id or uuid.uuid4().hex[:16])
        item = parse_google(json.dumps(envelope).encode(), PACKAGE)
        return self.inbox.accept(item, datetime.now(UTC)).id


@pytest.fixture
def harness(receipts_db: Database, apple_store: AppleStore) -> Iterator[Harness]:
    harness = Harness(receipts_db, apple_store)
    yield harness
    harness.loop.close()


def test_apple_types_end_to_end_through_the_ledger(harness: Harness) -> None:
    token = str(uuid.uuid4())
    harness.bindings.record_now("acct-1", token, "obf-1", datetime.now(UTC))
    tx = transaction("3000000001", app_account_token=token, quantity=2)
    assert harness.processor.process(harness.store_apple("ONE_TIME_CHARGE", tx))[0] == "credited"
    assert harness.ledger.balances["acct-1"] == 200
    # A transaction without our token is only recorded until the app reports it.
    stranger = transaction("3000000002", app_account_token=str(uuid.uuid4()))
    assert harness.processor.process(harness.store_apple("ONE_TIME_CHARGE", stranger))[0] == "recorded"
    assert harness.processor.process(harness.store_apple("CONSUMPTION_REQUEST", tx))[0] == "recorded"
    assert harness.processor.process(harness.store_apple("REFUND_DECLINED", tx))[0] == "recorded"
    prorated = {**tx, "revocationType": "REFUND_PRORATED", "revocationPercentage": 50_000, "revocationReason": 1}
    assert harness.processor.process(harness.store_apple("REFUND", prorated))[0] == "reversed"
    assert harness.ledger.balances["acct-1"] == 100
    # Apple re-sends the (new, full) refund state: state-based, only the difference moves.
    full = {**tx, "revocationType": "REFUND_FULL", "revocationReason": 0}
    assert harness.processor.process(harness.store_apple("REFUND", full))[0] == "reversed"
    assert harness.ledger.balances["acct-1"] == 0
    assert harness.processor.process(harness.store_apple("REFUND", full))[0] == "already_reversed"
    assert harness.processor.process(harness.store_apple("REFUND_REVERSED", tx))[0] == "restored"
    assert harness.ledger.balances["acct-1"] == 200
    assert harness.processor.process(harness.store_apple("TEST", tx))[0] == "test"
    assert harness.apple_api.sent == []


def test_consumption_request_is_answered_when_enabled(receipts_db: Database, apple_store: AppleStore) -> None:
    harness = Harness(receipts_db, apple_store, send_consumption=True)
    outcome, _ = harness.processor.process(harness.store_apple("CONSUMPTION_REQUEST", transaction("3000000003")))
    assert outcome == "consumption_sent"
    assert harness.apple_api.sent == [
        (
            "3000000003",
            "Sandbox",
            {
                "customerConsented": True,
                "sampleContentProvided": False,
                "deliveryStatus": "DELIVERED",
                "consumptionPercentage": 25_000,
            },
        )
    ]


def test_google_types_end_to_end_through_the_ledger(harness: Harness) -> None:
    harness.bindings.record_now("acct-g", str(uuid.uuid4()), "obf-g", datetime.now(UTC))
    harness.play.purchases["tok-1"] = {
        "obfuscatedExternalAccountId": "obf-g",
        "productLineItem": [
            {"productId": "coins_100", "productOfferDetails": {"quantity": 1, "refundableQuantity": 1}}
        ],
    }
    harness.play.purchases["tok-other"] = {"obfuscatedExternalAccountId": "someone-else", "productLineItem": []}
    assert harness.processor.process(harness.store_google(rtdn("oneTimeProductNotification", "tok-1")))[0] == "credited"
    assert harness.ledger.balances["acct-g"] == 100
    other = rtdn("oneTimeProductNotification", "tok-other")
    assert harness.processor.process(harness.store_google(other))[0] == "recorded"
    canceled = rtdn("oneTimeProductNotification", "tok-1", notificationType=2)
    assert harness.processor.process(harness.store_google(canceled))[0] == "canceled"
    assert harness.processor.process(harness.store_google(rtdn("testNotification")))[0] == "test"
    assert harness.processor.process(harness.store_google(rtdn("voidedPurchaseNotification", "tok-1")))[0] == "reversed"
    assert harness.ledger.balances["acct-g"] == 0


def test_google_partial_refund_uses_the_cumulative_quantity(harness: Harness) -> None:
    harness.ledger.add_purchase("GOOGLE_PLAY", "tok-5", "acct-p", quantity=5)
    details = {"quantity": 5, "refundableQuantity": 3}
    harness.play.purchases["tok-5"] = {"productLineItem": [{"productId": "coins_100", "productOfferDetails": details}]}
    partial = rtdn("voidedPurchaseNotification", "tok-5", refundType=2)
    assert harness.processor.process(harness.store_google(partial))[0] == "reversed"
    assert harness.ledger.balances["acct-p"] == 300
    # The same partial refund notified again (new messageId) moves nothing.
    assert harness.processor.process(harness.store_google(partial))[0] == "already_reversed"
    details["refundableQuantity"] = 2
    assert harness.processor.process(harness.store_google(partial))[0] == "reversed"
    assert harness.ledger.balances["acct-p"] == 200


def test_a_row_processed_concurrently_is_applied_once(harness: Harness) -> None:
    harness.ledger.add_purchase("APP_STORE", "3000000009", "acct-c")
    row = harness.store_apple("REFUND", transaction("3000000009"))
    barrier = threading.Barrier(10)
    outcomes: list[str] = []

    def worker() -> None:
        barrier.wait()
        outcomes.append(harness.processor.process(row)[0])

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["reversed"] + ["skipped"] * 9
    assert harness.ledger.calls.count(("reverse", "3000000009")) == 1
    assert harness.processor.process(row)[0] == "skipped"
    assert harness.inbox.outcome(row)[:2] == ("processed", "reversed")


def test_failures_are_retried_with_backoff_and_counted(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    harness.ledger.add_purchase("APP_STORE", "3000000010", "acct-f")
    row = harness.store_apple("REFUND", transaction("3000000010"))
    real_reverse = harness.ledger.reverse
    failures = iter([StoreUnavailable("wallet down"), StoreUnavailable("wallet down")])

    def flaky(**kwargs: Any) -> Any:
        error = next(failures, None)
        if error is not None:
            raise error
        return real_reverse(**kwargs)

    monkeypatch.setattr(harness.ledger, "reverse", flaky)
    outcome, delay = harness.processor.process(row)
    assert (outcome, delay) == ("failed", timedelta(seconds=5))
    # Not due yet: the sweeper leaves it alone until its backoff has passed.
    assert row not in harness.inbox.due(datetime.now(UTC), timedelta(seconds=30))
    assert row in harness.inbox.due(datetime.now(UTC) + timedelta(seconds=6), timedelta(seconds=30))
    assert harness.processor.process(row) == ("failed", timedelta(seconds=10))
    assert harness.processor.process(row)[0] == "reversed"
    assert harness.ledger.balances["acct-f"] == 0
    failed = harness.metrics.registry.get_sample_value(
        "coinstore_notification_failures_total", {"source": "apple", "dead": "false"}
    )
    assert failed == 2
    assert harness.inbox.counts() == {"processed": 1}


@pytest.mark.timeout(120)
def test_real_worker_processes_and_sweeper_requeues_lost_tasks(
    receipts_db: Database, apple_store: AppleStore, tmp_path: Path
) -> None:
    # The embedded broker is the one that loses unacknowledged messages: the sweeper's case.
    broker_url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    harness = Harness(receipts_db, apple_store)
    queue = f"receipts-{uuid.uuid4().hex[:8]}"
    app = make_celery_app(queue, broker_url)
    settings = ReceiptsSettings(database_url="sqlite://", notifications_sweep_seconds=0.0)  # type: ignore[call-arg]
    components = wiring.NotificationComponents(
        inbox=harness.inbox,
        bindings=harness.bindings,
        processor=harness.processor,
        actions=harness.ledger,
        apple_api=None,
        play=None,
        metrics=harness.metrics,
    )
    tasks_notifications.register(app, settings, factory=lambda: components, queue=queue)
    for i in range(3):
        harness.ledger.add_purchase("APP_STORE", f"31000000{i}", f"acct-w{i}")
    queued = harness.store_apple("REFUND", transaction("310000000"))
    lost = [harness.store_apple("REFUND", transaction(f"31000000{i}")) for i in (1, 2)]
    dispatch = tasks_notifications.sender(app, queue)
    with start_worker(app, pool="solo", perform_ping_check=False, queues=[queue], loglevel="WARNING"):
        dispatch(queued)  # the other two rows' tasks were "lost": only the sweeper can find them
        deadline = time.monotonic() + 60
        while harness.inbox.outcome(queued)[0] != "processed" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [harness.inbox.outcome(r)[0] for r in lost] == ["pending", "pending"]
        app.send_task(tasks_notifications.task_names(queue)[1], queue=queue)
        while any(harness.inbox.outcome(r)[0] != "processed" for r in lost) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert [harness.inbox.outcome(r)[0] for r in [queued, *lost]] == ["processed"] * 3
    assert all(harness.ledger.balances[f"acct-w{i}"] == 0 for i in range(3))
    assert sorted(c for c in harness.ledger.calls if c[0] == "reverse") == [
        ("reverse", f"31000000{i}") for i in range(3)
    ]


def test_new_notification_fields_are_kept(harness: Harness) -> None:
    row = harness.store_google(rtdn("voidedPurchaseNotification", "tok-keep", futureField="x"))
    stored = harness.inbox.claim(row, datetime.now(UTC))
    assert stored is not None
    assert stored.payload["notification"]["voidedPurchaseNotification"]["futureField"] == "x"


def test_unused_new_notification(harness: Harness) -> None:
    item = NewNotification("google", "m-unknown", "unknown", None, None, "{}", {"notification": {}})
    row = harness.inbox.accept(item, datetime.now(UTC)).id
    assert harness.processor.process(row)[0] == "ignored"
