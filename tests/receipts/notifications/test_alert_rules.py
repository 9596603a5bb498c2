"""The alert rules in deploy/prometheus/receipts-rules.yaml name metrics the
receipts service really exports, with the labels they select: a dead
notification shows in the very series the alert watches."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from services.common.clock import SystemClock
from services.common.db import Database
from services.common.metrics import Metrics
from services.common.settings import load_settings
from services.receipts.config import ReceiptsSettings
from services.receipts.notifications.repository import DeadLetterPolicy, InboxRepository, NewNotification, RetryPolicy
from services.receipts.notifications.webhooks import InboxCollector
from services.receipts.wiring import unchecked_age_collector

RULES = Path(__file__).resolve().parents[3] / "deploy" / "prometheus" / "receipts-rules.yaml"
SELECTOR = re.compile(r"(coinstore_[a-z_]+)(?:\{([^}]*)\})?")


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_rule_is_well_formed() -> None:
    loaded = rules()
    assert {r["alert"] for r in loaded} >= {"CoinstoreNotificationsDead"}
    for rule in loaded:
        assert SELECTOR.search(rule["expr"]), rule
        assert rule["labels"]["severity"] in ("page", "ticket")
        assert rule["annotations"]["summary"]


def test_a_dead_notification_shows_in_the_series_the_alert_watches(receipts_db: Database) -> None:
    inbox = InboxRepository(receipts_db, DeadLetterPolicy(default=RetryPolicy(max_attempts=1)))
    now = datetime.now(UTC)
    row = inbox.accept(NewNotification("apple", "u-dead", "CONSUMPTION_REQUEST", "1", None, "{}", {}), now).id
    assert inbox.claim(row, now) is not None
    assert inbox.fail(row, "boom", now)[0] == "dead"
    metrics = Metrics("receipts-test")
    metrics.registry.register(InboxCollector(inbox))
    (dead,) = [r for r in rules() if r["alert"] == "CoinstoreNotificationsDead"]
    name, labels = SELECTOR.search(dead["expr"]).groups()  # type: ignore[union-attr]
    selected = dict(re.findall(r'(\w+)="([^"]*)"', labels or ""))
    assert metrics.registry.get_sample_value(name, selected) == 1


def test_every_metric_a_rule_names_is_exported(receipts_db: Database) -> None:
    settings = load_settings(ReceiptsSettings, {"COINSTORE_DATABASE_URL": "sqlite://"})
    metrics = Metrics("receipts-test")
    metrics.registry.register(InboxCollector(InboxRepository(receipts_db)))
    metrics.registry.register(unchecked_age_collector(settings, receipts_db, SystemClock()))
    exported = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    named = {name for rule in rules() for name, _ in SELECTOR.findall(rule["expr"])}
    assert named <= exported
    # Never reconciled yet: everything in the promised window is unchecked.
    age = metrics.registry.get_sample_value("coinstore_reconcile_unchecked_age_seconds", {"source": "google"})
    assert age == settings.reconcile_google_days * 86400
    promise = metrics.registry.get_sample_value("coinstore_reconcile_promise_seconds")
    assert promise == settings.reconcile_promise_hours * 3600
