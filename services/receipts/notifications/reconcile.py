"""Reconciliation: the safety net under the webhooks.

Google: `purchases.voidedpurchases.list` over the last 30 days (the API's
limit), every page, within its quota (30 requests per 30 s, 6,000 per day).
Apple: Get Refund History (v2) for recent App Store purchases.

Whatever is found goes through the same exactly-once, state-based reversal
the notifications use (``Crediting.apply_refund``), so a refund already
applied moves nothing; the ones
that did move coins are counted in ``coinstore_reconcile_applied``. Request ids
carry the run, so the wallet's state-based answer (not an AIP-155 replay of an
earlier run's) says whether this run moved anything.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, InitVar, dataclass, field
from datetime import datetime, timedelta

from prometheus_client import Counter

from services.common.catalog import StoreId
from services.common.clock import Clock
from services.common.errors import Unavailable
from services.common.loop import OnLoop
from services.common.metrics import Metrics
from services.receipts.apple.client import AppStoreApi
from services.receipts.apple.jws import AppleJwsVerifier
from services.receipts.apple.rules import refund_of, transaction_id
from services.receipts.google.client import PlayClient
from services.receipts.google.rules import VoidedPurchase, VoidedQuery, refunded_quantity
from services.receipts.notifications.repository import ReconcileRunRepository
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.model import Refund
from services.receipts.purchases.repository import PurchaseRepository

log = logging.getLogger(__name__)

GOOGLE_MAX_LOOKBACK = timedelta(days=30)
APPLE_LOOKBACK = timedelta(days=30)


class QuotaExhausted(Exception):
    """The daily request budget is spent; the next run continues."""


@dataclass(eq=False)
class Quota:
    """A sliding window (``per_window`` requests per ``window`` seconds) plus a daily cap."""

    per_window: int = 30
    window: float = 30.0
    per_day: int = 6000
    _: KW_ONLY
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _recent: collections.deque[float] = field(default_factory=collections.deque, init=False)
    _day: collections.deque[float] = field(default_factory=collections.deque, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def acquire(self) -> None:
        with self._lock:
            now = self.clock()
            while self._day and now - self._day[0] >= 86400:
                self._day.popleft()
            if len(self._day) >= self.per_day:
                raise QuotaExhausted("daily voidedpurchases quota spent")
            while True:
                while self._recent and now - self._recent[0] >= self.window:
                    self._recent.popleft()
                if len(self._recent) < self.per_window:
                    break
                self.sleep(max(0.01, self.window - (now - self._recent[0])))
                now = self.clock()
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


def _apple_quota() -> Quota:
    """Get Refund History: 10 requests per second in production."""
    return Quota(per_window=10, window=1.0, per_day=10 * 86400)


@dataclass(eq=False, kw_only=True)
class Reconciler:
    """Runs from a worker thread; the purchases core and the App Store client run on
    ``loop`` (the core's event loop) while it waits."""

    crediting: Crediting
    purchases: PurchaseRepository
    runs: ReconcileRunRepository
    play: PlayClient
    apple_api: AppStoreApi
    apple_verifier: AppleJwsVerifier
    loop: OnLoop
    metrics: InitVar[Metrics]
    clock: Clock
    package_name: str
    google_quota: Quota = field(default_factory=Quota)
    apple_quota: Quota = field(default_factory=_apple_quota)
    examined: Counter = field(init=False)
    applied: Counter = field(init=False)

    def __post_init__(self, metrics: Metrics) -> None:
        self.examined = metrics.counter(
            "coinstore_reconcile_examined", "Store refund records reconciliation looked at", ("source",)
        )
        self.applied = metrics.counter(
            "coinstore_reconcile_applied",
            "Refunds reconciliation applied because no notification had (lost notifications)",
            ("source",),
        )

    def run(self, since: datetime | None = None, progress: Progress | None = None) -> list[ReconcileResult]:
        return [self.google(since, progress), self.apple(since, progress)]

    def _apply(self, refund: Refund, request_id: str) -> bool:
        return self.loop.run(self.crediting.apply_refund(refund, request_id=request_id))

    def google(self, since: datetime | None = None, progress: Progress | None = None) -> ReconcileResult:
        now = self.clock.now()
        start = max(since or now - GOOGLE_MAX_LOOKBACK, now - GOOGLE_MAX_LOOKBACK + timedelta(minutes=1))
        run_id = self.runs.start("google", start, now)
        result = ReconcileResult("google")
        voided: dict[str, list[VoidedPurchase]] = collections.defaultdict(list)
        token = ""
        while True:
            self.google_quota.acquire()
            page = self.play.list_voided_page(self.package_name, VoidedQuery(_ms(start), _ms(now)), token)
            result.pages += 1
            for record in page.purchases:
                voided[record.purchase_token].append(record)
            token = page.next_page_token
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
        self.runs.finish(run_id, result.examined, result.applied, self.clock.now())
        return result

    def _apply_google(self, run_id: int, purchase_token: str, records: list[VoidedPurchase]) -> bool:
        refunded = 0
        partial = all(r.voided_quantity for r in records)
        if partial:
            # Quantity-based partial refunds: Google's refundableQuantity gives the cumulative figure.
            try:
                refunded = refunded_quantity(self.play.get_purchase_v2(self.package_name, purchase_token))
            except Unavailable:
                raise
            except Exception:
                refunded = sum(r.voided_quantity or 0 for r in records)
        order = records[-1].order_id
        refund = Refund(
            StoreId.GOOGLE_PLAY,
            purchase_token,
            None,
            full=not partial,
            refunded_quantity=refunded,
            reason=f"google voidedpurchases orderId={order} reason={records[-1].voided_reason}",
        )
        applied = self._apply(refund, f"reconcile:{run_id}:google:{purchase_token}:{refunded}"[:128])
        if applied:
            log.warning("reconciliation applied a Play refund no notification had", extra={"order_id": order})
        return applied

    def apple(self, since: datetime | None = None, progress: Progress | None = None) -> ReconcileResult:
        now = self.clock.now()
        start = since or now - APPLE_LOOKBACK
        run_id = self.runs.start("apple", start, now)
        result = ReconcileResult("apple")
        seen: set[str] = set()
        for txid, environment in self.loop.run(self.purchases.recent(StoreId.APP_STORE, start)):
            revision = ""
            while True:
                self.apple_quota.acquire()
                page = self.loop.run(self.apple_api.get_refund_history(environment, txid, revision))
                result.pages += 1
                for signed in page.signed_transactions:
                    refund = self.apple_verifier.verify_blocking(signed, "signedPayload", self.loop)
                    refunded_id = transaction_id(refund)
                    if refunded_id in seen:
                        continue
                    seen.add(refunded_id)
                    result.examined += 1
                    self.examined.labels("apple").inc()
                    if self._apply_apple(run_id, refund_of(refund, "apple refund history")):
                        result.applied += 1
                        self.applied.labels("apple").inc()
                revision = page.revision
                if not page.has_more or not revision:
                    break
            if progress is not None:
                progress(1)
        self.runs.finish(run_id, result.examined, result.applied, self.clock.now())
        return result

    def _apply_apple(self, run_id: int, refund: Refund) -> bool:
        txid, percentage = refund.store_transaction_id, refund.refunded_percentage_milli
        return self._apply(refund, f"reconcile:{run_id}:apple:{txid}:{percentage}"[:128])
