"""Reconciliation: the safety net under the webhooks.

Google: `purchases.voidedpurchases.list` over the last 30 days (the API's
limit), every page, within its quota (30 requests per 30 s, 6,000 per day).
Apple: Get Refund History (v2) for recent App Store purchases.

Whatever is found goes through the same exactly-once, state-based reversal
the notifications use, so a refund already applied moves nothing; the ones
that did move coins are counted in ``coinstore_reconcile_applied``. Request ids
carry the run, so the wallet's state-based answer (not an AIP-155 replay of an
earlier run's) says whether this run moved anything.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from services.common.clock import Clock
from services.common.metrics import Metrics
from services.receipts.notifications.ports import (
    AppleJwsVerifier,
    AppleServerApi,
    PlayApi,
    PurchaseActions,
    RecentPurchases,
    StoreUnavailable,
)
from services.receipts.notifications.processor import APP_STORE, GOOGLE_PLAY, refunded_quantity_from_play
from services.receipts.notifications.repository import ReconcileRuns

log = logging.getLogger(__name__)

GOOGLE_MAX_LOOKBACK = timedelta(days=30)
APPLE_LOOKBACK = timedelta(days=30)


class QuotaExhausted(Exception):
    """The daily request budget is spent; the next run continues."""


class Quota:
    """A sliding window (``per_window`` requests per ``window`` seconds) plus a daily cap."""

    def __init__(
        self,
        per_window: int = 30,
        window: float = 30.0,
        per_day: int = 6000,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._per_window = per_window
        self._window = window
        self._per_day = per_day
        self._clock = clock
        self._sleep = sleep
        self._recent: collections.deque[float] = collections.deque()
        self._day: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = self._clock()
            while self._day and now - self._day[0] >= 86400:
                self._day.popleft()
            if len(self._day) >= self._per_day:
                raise QuotaExhausted("daily voidedpurchases quota spent")
            while True:
                while self._recent and now - self._recent[0] >= self._window:
                    self._recent.popleft()
                if len(self._recent) < self._per_window:
                    break
                self._sleep(max(0.01, self._window - (now - self._recent[0])))
                now = self._clock()
            self._recent.append(now)
            self._day.append(now)


@dataclass
class ReconcileResult:
    source: str
    examined: int = 0
    applied: int = 0
    pages: int = 0


Progress = Callable[[int], None]


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class Reconciler:
    def __init__(
        self,
        *,
        actions: PurchaseActions,
        runs: ReconcileRuns,
        metrics: Metrics,
        clock: Clock,
        package_name: str,
        play: PlayApi | None = None,
        google_quota: Quota | None = None,
        apple_quota: Quota | None = None,
        apple_api: AppleServerApi | None = None,
        apple_verifier: AppleJwsVerifier | None = None,
        recent: RecentPurchases | None = None,
    ) -> None:
        self._actions = actions
        self._runs = runs
        self._clock = clock
        self._package = package_name
        self._play = play
        self._quota = google_quota or Quota()
        # Get Refund History: 10 requests per second in production.
        self._apple_quota = apple_quota or Quota(per_window=10, window=1.0, per_day=10 * 86400)
        self._apple = apple_api
        self._verifier = apple_verifier
        self._recent = recent
        self.examined = metrics.counter(
            "coinstore_reconcile_examined", "Store refund records reconciliation looked at", ("source",)
        )
        self.applied = metrics.counter(
            "coinstore_reconcile_applied",
            "Refunds reconciliation applied because no notification had (lost notifications)",
            ("source",),
        )

    def run(self, since: datetime | None = None, progress: Progress | None = None) -> list[ReconcileResult]:
        results = []
        if self._play is not None:
            results.append(self.google(since, progress))
        if self._apple is not None and self._verifier is not None and self._recent is not None:
            results.append(self.apple(since, progress))
        return results

    def google(self, since: datetime | None = None, progress: Progress | None = None) -> ReconcileResult:
        assert self._play is not None
        now = self._clock.now()
        start = max(since or now - GOOGLE_MAX_LOOKBACK, now - GOOGLE_MAX_LOOKBACK + timedelta(minutes=1))
        run_id = self._runs.start("google", start, now)
        result = ReconcileResult("google")
        voided: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
        token: str | None = None
        while True:
            self._quota.acquire()
            page = self._play.list_voided_purchases(self._package, _ms(start), _ms(now), token)
            result.pages += 1
            for record in page.get("voidedPurchases") or []:
                voided[str(record["purchaseToken"])].append(record)
            token = (page.get("tokenPagination") or {}).get("nextPageToken")
            if not token:
                break
        for purchase_token, records in voided.items():
            result.examined += 1
            self.examined.labels("google").inc()
            if self._apply_google(run_id, purchase_token, records):
                result.applied += 1
                self.applied.labels("google").inc()
            if progress is not None:
                progress(1)
        self._runs.finish(run_id, result.examined, result.applied, self._clock.now())
        return result

    def _apply_google(self, run_id: int, purchase_token: str, records: list[Mapping[str, Any]]) -> bool:
        refunded = 0
        partial = all(r.get("voidedQuantity") for r in records)
        if partial:
            # Quantity-based partial refunds: Google's refundableQuantity gives the cumulative figure.
            try:
                refunded = refunded_quantity_from_play(
                    self._play.get_product_purchase_v2(self._package, purchase_token)  # type: ignore[union-attr]
                )
            except StoreUnavailable:
                raise
            except Exception:
                refunded = sum(int(r["voidedQuantity"]) for r in records)
        order = records[-1].get("orderId", "")
        applied = self._actions.reverse(
            store=GOOGLE_PLAY,
            store_transaction_id=purchase_token,
            environment="",
            full=not partial,
            refunded_quantity=refunded,
            refunded_percentage_milli=0,
            reason=f"google voidedpurchases orderId={order} reason={records[-1].get('voidedReason')}",
            request_id=f"reconcile:{run_id}:google:{purchase_token}:{refunded}"[:128],
        )
        if applied.changed:
            log.warning("reconciliation applied a Play refund no notification had", extra={"order_id": order})
        return applied.changed

    def apple(self, since: datetime | None = None, progress: Progress | None = None) -> ReconcileResult:
        assert self._apple is not None
        assert self._verifier is not None
        assert self._recent is not None
        now = self._clock.now()
        start = since or now - APPLE_LOOKBACK
        run_id = self._runs.start("apple", start, now)
        result = ReconcileResult("apple")
        seen: set[str] = set()
        for transaction_id, environment in self._recent.recent_apple_transactions(_ms(start)):
            revision: str | None = None
            while True:
                self._apple_quota.acquire()
                page = self._apple.get_refund_history(transaction_id, environment, revision)
                result.pages += 1
                for signed in page.get("signedTransactions") or []:
                    refund = self._verifier.verify(signed)
                    refunded_id = str(refund.get("transactionId"))
                    if refunded_id in seen:
                        continue
                    seen.add(refunded_id)
                    result.examined += 1
                    self.examined.labels("apple").inc()
                    if self._apply_apple(run_id, refund):
                        result.applied += 1
                        self.applied.labels("apple").inc()
                revision = page.get("revision")
                if not page.get("hasMore") or not revision:
                    break
            if progress is not None:
                progress(1)
        self._runs.finish(run_id, result.examined, result.applied, self._clock.now())
        return result

    def _apply_apple(self, run_id: int, refund: Mapping[str, Any]) -> bool:
        prorated = refund.get("revocationType") == "REFUND_PRORATED"
        percentage = int(refund.get("revocationPercentage") or 0) if prorated else 0
        txid = str(refund.get("transactionId"))
        applied = self._actions.reverse(
            store=APP_STORE,
            store_transaction_id=txid,
            environment=str(refund.get("environment") or ""),
            full=not prorated,
            refunded_quantity=0,
            refunded_percentage_milli=percentage,
            reason=f"apple refund history reason={refund.get('revocationReason')}",
            request_id=f"reconcile:{run_id}:apple:{txid}:{percentage}"[:128],
        )
        return applied.changed
