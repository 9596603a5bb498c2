"""Reconciliation finds refunds whose notification was lost and applies them
once: Apple through Get Refund History against the simulator and the real
wallet (by the CLI, in a real process); Google's voidedpurchases paging and
quota with a fake Play API in front of the receipts core and the real wallet."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from services.common.clock import SystemClock
from services.common.loop import OnLoop
from services.common.metrics import Metrics
from services.receipts.cli import parse_since
from services.receipts.google.client import PlayClient
from services.receipts.google.rules import PurchaseV2, VoidedPage, VoidedPurchase, VoidedQuery
from services.receipts.notifications import tasks as notification_tasks
from services.receipts.notifications.reconcile import Quota, QuotaExhausted
from services.receipts.notifications.repository import ReconcileRunRepository
from services.receipts.purchases.model import Claim, Outcome
from services.receipts.wiring import reconciler, unchecked_age_collector
from tests.receipts.notifications.conftest import Core
from tests.receipts.notifications.system import running_system
from tests.support.tokens import Keys

REPO = Path(__file__).resolve().parents[3]
PACK = "com.coinstore.coins.350"


@pytest.mark.timeout(180)
async def test_lost_apple_refund_is_found_and_applied_once(database_url: str, keys: Keys, tmp_path: Path) -> None:
    async with running_system(database_url, keys, tmp_path, with_worker=False) as s:
        s.notifier.config.auto = False
        token, _ = await s.bind("fan-r")
        bought = await s.sim("/apple/buy", {"productId": PACK, "appAccountToken": token})
        await s.components.apple.verify(Claim("fan-r", "r-1"), signed_transaction=bought["signedTransaction"])
        assert await s.balance("fan-r") == 350
        s.notifier.config.auto = True
        s.notifier.config.lose_next = 1
        await s.sim("/apple/refund", {"transactionId": bought["transactionId"]})
        assert [d.state for d in s.notifier.deliveries.values()] == ["lost"]
        assert await s.balance("fan-r") == 350

        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'gen'}",
            **{f"COINSTORE_{k.upper()}": str(v) for k, v in _environment(s.settings).items()},
        }
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "receipts", "reconcile", "--since", "1d", "--store", "apple",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(cli.communicate(), 120)
        assert cli.returncode == 0, err.decode()
        assert "apple: examined 1, applied 1" in out.decode()
        assert "reconciling" in err.decode()  # the progress bar
        assert await s.balance("fan-r") == 0

        # Again, in process: the refund is already applied and moves nothing.
        metrics = Metrics("receipts-test")
        again = reconciler(s.settings, s.components, OnLoop(asyncio.get_running_loop()), metrics)
        result = await asyncio.to_thread(again.apple, datetime.now(UTC) - timedelta(days=1))
        assert (result.examined, result.applied) == (1, 0)
        assert metrics.registry.get_sample_value("coinstore_reconcile_applied_total", {"source": "apple"}) is None
        assert await s.balance("fan-r") == 0


@pytest.mark.timeout(180)
async def test_lost_play_refund_is_found_and_applied_once(database_url: str, keys: Keys, tmp_path: Path) -> None:
    async with running_system(database_url, keys, tmp_path) as s:
        _, obfuscated = await s.bind("fan-v")
        bought = await s.sim("/google/sim/purchases", {"productId": "coins_350", "obfuscatedAccountId": obfuscated})
        await s.wait_balance("fan-v", 350)
        s.push.config.lose_next = 1
        await s.sim(f"/google/sim/purchases/{bought['purchaseToken']}/refund", {})
        assert [d.state for d in s.push.deliveries.values()][-1] == "lost"
        assert await s.balance("fan-v") == 350

        metrics = Metrics("receipts-test")
        play_refunds = reconciler(s.settings, s.components, OnLoop(asyncio.get_running_loop()), metrics)
        first = await asyncio.to_thread(play_refunds.google)
        assert (first.examined, first.applied) == (1, 1)
        assert await s.balance("fan-v") == 0
        second = await asyncio.to_thread(play_refunds.google)
        assert (second.examined, second.applied) == (1, 0)
        assert metrics.registry.get_sample_value("coinstore_reconcile_applied_total", {"source": "google"}) == 1
        assert await s.balance("fan-v") == 0


def _environment(settings: Any) -> dict[str, Any]:
    names = (
        "database_url",
        "catalog",
        "auth_signing_key",
        "wallet_address",
        "apple_api_url",
        "apple_sandbox_api_url",
        "apple_api_key_file",
    )
    values: dict[str, Any] = {n: getattr(settings, n) for n in names}
    values["auth_trusted_keys"] = ",".join(str(p) for p in settings.auth_trusted_keys)
    values["apple_root_certs"] = ",".join(str(p) for p in settings.apple_root_certs)
    return values


class PagedPlay:
    """voidedpurchases.list over ``records``, ``page_size`` per page, with the API's continuation token."""

    def __init__(self, records: list[dict[str, Any]], page_size: int, purchases: dict[str, Any]) -> None:
        self.records = records
        self.page_size = page_size
        self.purchases = purchases
        self.calls: list[str] = []
        self.queries: list[VoidedQuery] = []

    def get_purchase_v2(self, package_name: str, token: str) -> PurchaseV2:
        return PurchaseV2.parse(self.purchases[token])

    def list_voided_page(self, package_name: str, query: VoidedQuery, page_token: str = "") -> VoidedPage:
        self.calls.append(page_token)
        self.queries.append(query)
        offset = int(page_token or 0)
        page = tuple(VoidedPurchase.parse(r) for r in self.records[offset : offset + self.page_size])
        more = offset + self.page_size < len(self.records)
        return VoidedPage(page, str(offset + self.page_size) if more else "")


def test_google_voided_purchases_are_paged_and_applied_once(receipts_db: Any, core: Core) -> None:
    tokens = [core.play.buy("coins_70", quantity=4).token for _ in range(7)]
    google = core.components.google
    for i, token in enumerate(tokens):
        result = core.loop.run(google.credit_token(token, "coins_70", Claim(f"acct-{i}", f"r-{i}")))
        assert result.outcome is Outcome.CREDITED
    records: list[dict[str, Any]] = [
        {"purchaseToken": t, "orderId": f"GPA.{i}", "voidedReason": 1} for i, t in enumerate(tokens[:6])
    ]
    # The last was refunded 1 of 4 packs (quantity-based); Google's refundableQuantity says 3 remain.
    records.append({"purchaseToken": tokens[6], "orderId": "GPA.6", "voidedQuantity": 1})
    details = {"quantity": 4, "refundableQuantity": 3}
    play = PagedPlay(records, 3, {tokens[6]: {"productLineItem": [{"productOfferDetails": details}]}})
    metrics = Metrics("receipts-test")
    voided = reconciler(core.settings, core.components, core.loop, metrics)
    voided.play = cast(PlayClient, play)
    first = voided.google()
    assert (first.examined, first.applied, first.pages) == (7, 7, 3)
    assert play.calls == ["", "3", "6"]
    assert [core.balance(f"acct-{i}") for i in range(7)] == [0] * 6 + [210]
    again = voided.google(datetime.now(UTC) - timedelta(days=90))
    assert (again.examined, again.applied) == (7, 0)
    assert [core.ledger(f"acct-{i}") for i in (0, 6)] == [
        [(tokens[0], 280), (tokens[0], -280)],
        [(tokens[6], 280), (tokens[6], -70)],
    ]
    assert metrics.registry.get_sample_value("coinstore_reconcile_applied_total", {"source": "google"}) == 7
    assert ReconcileRunRepository(receipts_db).last_finished("google") is not None


def unchecked_age(core: Core, source: str) -> float:
    """coinstore_reconcile_unchecked_age_seconds{source}, as the receipts metrics port shows it."""
    metrics = Metrics("receipts-test")
    metrics.registry.register(unchecked_age_collector(core.settings, core.components.database, SystemClock()))
    value = metrics.registry.get_sample_value("coinstore_reconcile_unchecked_age_seconds", {"source": source})
    assert value is not None
    return value


def test_google_reconciliation_resumes_where_a_run_stopped(core: Core) -> None:
    tokens = [core.play.buy("coins_70").token for _ in range(5)]
    google = core.components.google
    for i, token in enumerate(tokens):
        core.loop.run(google.credit_token(token, "coins_70", Claim(f"acct-s{i}", f"r-s{i}")))
    records: list[dict[str, Any]] = [{"purchaseToken": t, "orderId": f"GPA.{i}"} for i, t in enumerate(tokens)]
    play = PagedPlay(records, 2, {})
    voided = reconciler(core.settings, core.components, core.loop, Metrics("receipts-test"))
    voided.play = cast(PlayClient, play)
    # The day's budget runs out after two pages: the run stops, its place saved.
    voided.google_quota = Quota(per_day=2)
    first = voided.google()
    assert (first.pages, first.applied, first.complete) == (2, 4, False)
    assert play.calls == ["", "2"]
    assert unchecked_age(core, "google") >= timedelta(days=30).total_seconds()
    # The next run continues at the saved token, in the same window.
    voided.google_quota = Quota()
    second = voided.google()
    assert (second.pages, second.applied, second.complete) == (1, 1, True)
    assert play.calls[2:] == ["4"]
    assert play.queries[2] == play.queries[0]
    assert unchecked_age(core, "google") < 60
    assert [core.balance(f"acct-s{i}") for i in range(5)] == [0] * 5
    # Then a new window, reaching back into the last one by the overlap; nothing more moves.
    third = voided.google()
    assert (third.examined, third.applied) == (5, 0)
    assert play.calls[3] == ""
    overlap = int(core.settings.reconcile_overlap_hours * 3600 * 1000)
    assert play.queries[3].start_time_ms == play.queries[0].end_time_ms - overlap  # type: ignore[operator]


@pytest.mark.timeout(180)
async def test_lost_notifications_of_each_kind_are_found_by_the_worker_within_one_run(
    database_url: str, keys: Keys, tmp_path: Path
) -> None:
    async with running_system(database_url, keys, tmp_path) as s:
        token, obfuscated = await s.bind("fan-lost")
        # Apple: the purchase's notification is lost, then its refund's.
        s.notifier.config.lose_next = 1
        bought = await s.sim("/apple/buy", {"productId": PACK, "appAccountToken": token})
        s.notifier.config.lose_next = 1
        await s.sim("/apple/refund", {"transactionId": bought["transactionId"]})
        # Google: a credited purchase whose voided notification is lost.
        play = await s.sim("/google/sim/purchases", {"productId": "coins_350", "obfuscatedAccountId": obfuscated})
        await s.wait_balance("fan-lost", 350)
        s.push.config.lose_next = 1
        await s.sim(f"/google/sim/purchases/{play['purchaseToken']}/refund", {})
        # And an Apple purchase whose notification alone is lost.
        s.notifier.config.lose_next = 1
        await s.sim("/apple/buy", {"productId": PACK, "appAccountToken": token})
        assert await s.balance("fan-lost") == 350
        s.celery.send_task(notification_tasks.task_names(s.queue)[2], queue=s.queue)
        await wait_for_runs(s, 3)
        # Apple's refunded purchase is credited and reversed, Play's refunded, the other credited.
        ledger = [coins for _, coins in await ledger_of(s, "fan-lost")]
        assert sorted(ledger) == sorted([350, -350, 350, -350, 350])
        assert await s.balance("fan-lost") == 350
        # A second run applies nothing.
        again = reconciler(s.settings, s.components, OnLoop(asyncio.get_running_loop()), Metrics("receipts-test"))
        results = await asyncio.to_thread(again.run)
        assert [(r.source, r.applied) for r in results] == [("google", 0), ("apple", 0)]
        assert await s.balance("fan-lost") == 350


async def ledger_of(s: Any, account_id: str) -> list[tuple[str, int]]:
    from tests.receipts.support import ledger

    return await ledger(s.wallet, account_id)


async def wait_for_runs(s: Any, count: int) -> None:
    runs = ReconcileRunRepository(s.components.database)
    deadline = asyncio.get_running_loop().time() + 60
    while sum(1 for source in ("google", "apple:production", "apple:sandbox") if runs.last_finished(source)) < count:
        assert asyncio.get_running_loop().time() < deadline, "reconciliation did not finish"
        await asyncio.sleep(0.1)


def test_quota_spreads_requests_and_stops_at_the_daily_cap() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    quota = Quota(per_window=30, window=30.0, per_day=70, clock=lambda: now[0], sleep=sleep)
    for _ in range(30):
        quota.acquire()
        now[0] += 0.1
    assert slept == []
    quota.acquire()  # the 31st waits for the window to slide
    assert slept
    assert now[0] >= 30.0
    for _ in range(39):
        quota.acquire()
    with pytest.raises(QuotaExhausted):
        quota.acquire()


def test_since_accepts_relative_and_iso() -> None:
    now = datetime(2026, 11, 24, 12, tzinfo=UTC)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_since("2026-11-01T10:00:00Z", now) == datetime(2026, 11, 1, 10, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError, match="since"):
        parse_since("last tuesday", now)
