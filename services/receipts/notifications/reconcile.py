"""Reconciliation: the safety net under the webhooks, covering everything.

The promise (settings): every refund of a purchase younger than N days
(``COINSTORE_RECONCILE_APPLE_DAYS``, at most Apple's 180;
``COINSTORE_RECONCILE_GOOGLE_DAYS``, at most Google's 30) is looked at within M hours
(``COINSTORE_RECONCILE_PROMISE_HOURS``) of the store listing it. Each source keeps a
cursor (``receipts_reconcile_cursors``): the window it is reading, the store's
pagination token for that window, saved after every page, and ``checked_through``,
the end of the last window read completely. A run resumes the stored window at its
token; a finished window is followed by a new one from ``checked_through`` minus an
overlap (records the store lists late) to now; the first one reaches back N days.
``coinstore_reconcile_unchecked_age_seconds{source}`` is how old the oldest moment
not yet checked is; it stays under M hours while the promise holds.

- App Store: Get Notification History (50 requests/s in Production, 10 % of it in
  the Sandbox), every page. Each ONE_TIME_CHARGE, REFUND, REFUND_REVERSED and
  REFUND_DECLINED is verified exactly as the webhook does and stored in the inbox by
  its notificationUUID: one already there is a duplicate and moves nothing; a lost
  one is processed now, by the same processor as a delivered one.
- Google Play: ``voidedpurchases.list`` (30 requests per 30 s, 6,000 per day), every
  page; each voided purchase goes through the state-based reversal
  (``Crediting.apply_refund``), which moves nothing for a refund already applied.

Whatever moved is counted in ``coinstore_reconcile_applied{source}``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, InitVar, dataclass, field
from datetime import datetime, timedelta

from prometheus_client import Counter
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from services.common.catalog import StoreId
from services.common.clock import Clock
from services.common.errors import DomainError, Unavailable
from services.common.loop import OnLoop
from services.common.metrics import Metrics
from services.receipts.apple.client import AppStoreApi
from services.receipts.apple.jws import AppleJwsVerifier
from services.receipts.google.client import PlayApiError, PlayClient
from services.receipts.google.rules import VoidedPurchase, VoidedQuery, refunded_quantity
from services.receipts.notifications.handle import InboxProcessor
from services.receipts.notifications.parse import AppleExpectations, Rejected, parse_apple
from services.receipts.notifications.repository import (
    Cursor,
    CursorRepository,
    InboxRepository,
    ReconcileRunRepository,
)
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.model import Environment, Refund

log = logging.getLogger(__name__)

GOOGLE_MAX_LOOKBACK = timedelta(days=30)
APPLE_MAX_LOOKBACK = timedelta(days=180)
# Kept clear of the stores' limits, so a request is never refused for its start date.
_MARGIN = timedelta(minutes=5)
# The App Store notifications whose loss costs money or misleads (the others are not reconciled).
APPLE_TYPES = frozenset({"ONE_TIME_CHARGE", "REFUND", "REFUND_REVERSED", "REFUND_DECLINED"})
# Outcomes of a processed notification that moved coins.
EFFECTS = frozenset({"credited", "reversed", "restored"})


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
                raise QuotaExhausted("daily request quota spent")
            while True:
                while self._recent and now - self._recent[0] >= self.window:
                    self._recent.popleft()
                if len(self._recent) < self.per_window:
                    break
                self.sleep(max(0.01, self.window - (now - self._recent[0])))
                now = self.clock()
            self._recent.append(now)
            self._day.append(now)


def apple_quota(environment: Environment) -> Quota:
    """Get Notification History: 50 requests/s in Production, 10 % of that in the Sandbox."""
    per_second = 50 if environment is Environment.PRODUCTION else 5
    return Quota(per_window=per_second, window=1.0, per_day=per_second * 86400)


@dataclass
class ReconcileResult:
    source: str
    examined: int = 0
    applied: int = 0
    pages: int = 0
    # False when the run stopped before the end of its window (it resumes next time).
    complete: bool = True


Progress = Callable[[int], None]


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Promise:
    """How far back each store is reconciled, and the overlap of consecutive windows."""

    apple_lookback: timedelta = APPLE_MAX_LOOKBACK
    google_lookback: timedelta = GOOGLE_MAX_LOOKBACK
    overlap: timedelta = timedelta(hours=24)


@dataclass(eq=False, kw_only=True)
class Reconciler:
    """Runs from a worker thread; the purchases core and the App Store client run on
    ``loop`` (the core's event loop) while it waits."""

    crediting: Crediting
    runs: ReconcileRunRepository
    cursors: CursorRepository
    inbox: InboxRepository
    processor: InboxProcessor
    play: PlayClient
    apple_api: AppStoreApi
    apple_verifier: AppleJwsVerifier
    apple_expectations: AppleExpectations
    apple_environments: tuple[Environment, ...] = (Environment.PRODUCTION, Environment.SANDBOX)
    loop: OnLoop
    metrics: InitVar[Metrics]
    clock: Clock
    package_name: str
    promise: Promise = field(default_factory=Promise)
    google_quota: Quota = field(default_factory=Quota)
    apple_quotas: dict[Environment, Quota] = field(
        default_factory=lambda: {environment: apple_quota(environment) for environment in Environment}
    )
    examined: Counter = field(init=False)
    applied: Counter = field(init=False)

    def __post_init__(self, metrics: Metrics) -> None:
        self.examined = metrics.counter(
            "coinstore_reconcile_examined", "Store refund records reconciliation looked at", ("source",)
        )
        self.applied = metrics.counter(
            "coinstore_reconcile_applied",
            "Refunds and purchases reconciliation applied because no notification had (lost notifications)",
            ("source",),
        )

    def run(self, since: datetime | None = None, progress: Progress | None = None) -> list[ReconcileResult]:
        return [self.google(since, progress), self.apple(since, progress)]

    # --- windows ---------------------------------------------------------------

    def _window(self, source: str, lookback: timedelta, since: datetime | None) -> Cursor:
        """The window to read: ``since`` to now (by hand, not resumed), the stored unfinished
        window, or a new one from the last checked moment (less the overlap) to now."""
        now = self.clock.now()
        earliest = now - lookback + _MARGIN
        stored = self.cursors.get(source)
        checked = stored.checked_through if stored is not None else None
        if since is not None:
            return Cursor(source, max(since, earliest), now, "", checked)
        if stored is not None and stored.page_token:
            return stored
        start = earliest if checked is None else max(earliest, checked - self.promise.overlap)
        return Cursor(source, start, now, "", checked)

    def _pages(
        self, cursor: Cursor, result: ReconcileResult, resumable: bool, read: Callable[[Cursor], tuple[str, bool]]
    ) -> None:
        """Read the window page by page with ``read`` (it handles one page and returns the
        next token and whether more follow), saving the cursor after every page."""
        while True:
            token, more = read(cursor)
            result.pages += 1
            if not more or not token:
                finished = Cursor(cursor.source, cursor.window_start, cursor.window_end, "", cursor.window_end)
                if resumable:
                    self.cursors.save(finished, self.clock.now())
                return
            cursor = Cursor(cursor.source, cursor.window_start, cursor.window_end, token, cursor.checked_through)
            if resumable:
                self.cursors.save(cursor, self.clock.now())

    def _read_window(
        self, cursor: Cursor, result: ReconcileResult, resumable: bool, read: Callable[[Cursor], tuple[str, bool]]
    ) -> None:
        """Read the window; a spent quota or an unavailable store stops the run (the next
        resumes at the saved page); a refused page token restarts the window next time."""
        try:
            self._pages(cursor, result, resumable, read)
        except (QuotaExhausted, Unavailable) as error:
            result.complete = False
            log.warning("reconciliation of %s stopped; the next run resumes it: %s", cursor.source, error)
        except (DomainError, PlayApiError) as error:
            result.complete = False
            stored = self.cursors.get(cursor.source) if resumable else None
            if stored is None or not stored.page_token:
                raise
            # The store no longer takes the saved token (expired): read the window again from its start.
            log.warning("reconciliation of %s: page token refused (%s); the window starts over", cursor.source, error)
            restart = Cursor(stored.source, stored.window_start, stored.window_end, "", stored.checked_through)
            self.cursors.save(restart, self.clock.now())

    # --- Google Play -------------------------------------------------------------

    def google(self, since: datetime | None = None, progress: Progress | None = None) -> ReconcileResult:
        cursor = self._window("google", min(self.promise.google_lookback, GOOGLE_MAX_LOOKBACK), since)
        run_id = self.runs.start("google", cursor.window_start, self.clock.now())
        result = ReconcileResult("google")

        def read(window: Cursor) -> tuple[str, bool]:
            self.google_quota.acquire()
            query = VoidedQuery(_ms(window.window_start), _ms(window.window_end))
            page = self.play.list_voided_page(self.package_name, query, window.page_token)
            voided: dict[str, list[VoidedPurchase]] = collections.defaultdict(list)
            for record in page.purchases:
                voided[record.purchase_token].append(record)
            for purchase_token, records in voided.items():
                result.examined += 1
                self.examined.labels("google").inc()
                if self._apply_google(run_id, purchase_token, records):
                    result.applied += 1
                    self.applied.labels("google").inc()
                if progress is not None:
                    progress(1)
            return page.next_page_token, bool(page.next_page_token)

        self._read_window(cursor, result, since is None, read)
        self.runs.finish(run_id, result.examined, result.applied, self.clock.now())
        return result

    def _apply_google(self, run_id: int, purchase_token: str, records: list[VoidedPurchase]) -> bool:
        refunded = 0
        partial = all(r.voided_quantity for r in records)
        if partial:
            # Quantity-based partial refunds: Google's refundableQuantity gives the cumulative
            # figure; the records listed are a floor while it is not updated yet.
            listed = sum(r.voided_quantity or 0 for r in records)
            try:
                refunded = max(listed, refunded_quantity(self.play.get_purchase_v2(self.package_name, purchase_token)))
            except PlayApiError:
                refunded = listed
        order = records[-1].order_id
        refund = Refund(
            StoreId.GOOGLE_PLAY,
            purchase_token,
            None,
            full=not partial,
            refunded_quantity=refunded,
            reason=f"google voidedpurchases orderId={order} reason={records[-1].voided_reason}",
        )
        # Play tokens run past 128 characters: a cut id could name two purchases (or drop the quantity).
        token_digest = hashlib.sha256(purchase_token.encode()).hexdigest()[:32]
        request_id = f"reconcile:{run_id}:google:{token_digest}:{refunded}"
        applied = self.loop.run(self.crediting.apply_refund(refund, request_id=request_id))
        if applied:
            log.warning("reconciliation applied a Play refund no notification had", extra={"order_id": order})
        return applied

    # --- App Store ---------------------------------------------------------------

    def apple(self, since: datetime | None = None, progress: Progress | None = None) -> ReconcileResult:
        result = ReconcileResult("apple")
        for environment in self.apple_environments:
            self._apple_environment(environment, since, progress, result)
        return result

    def _apple_environment(
        self, environment: Environment, since: datetime | None, progress: Progress | None, result: ReconcileResult
    ) -> None:
        source = f"apple:{environment.value}"
        cursor = self._window(source, min(self.promise.apple_lookback, APPLE_MAX_LOOKBACK), since)
        run_id = self.runs.start(source, cursor.window_start, self.clock.now())
        quota = self.apple_quotas[environment]
        examined, applied = result.examined, result.applied

        def read(window: Cursor) -> tuple[str, bool]:
            quota.acquire()
            page = self.loop.run(
                self.apple_api.get_notification_history(
                    environment,
                    _ms(window.window_start),
                    _ms(window.window_end),
                    pagination_token=window.page_token,
                )
            )
            for item in page.items:
                self._apple_notification(item.signed_payload, result)
                if progress is not None:
                    progress(1)
            return page.pagination_token, page.has_more

        self._read_window(cursor, result, since is None, read)
        self.runs.finish(run_id, result.examined - examined, result.applied - applied, self.clock.now())

    def _apple_notification(self, signed_payload: str, result: ReconcileResult) -> None:
        """Store a notification from the history as the webhook would; process it if it was lost."""
        body = json.dumps({"signedPayload": signed_payload}).encode()
        try:
            item = parse_apple(body, self.apple_verifier, self.apple_expectations, self.loop)
        except Rejected as rejected:
            log.warning("notification history: a notification was refused: %s", rejected)
            return
        if item.notification_type not in APPLE_TYPES:
            return
        result.examined += 1
        self.examined.labels("apple").inc()
        accepted = self.inbox.accept(item, self.clock.now())
        if accepted.duplicate:
            return
        outcome, _ = self.processor.process(accepted.id)
        if outcome in EFFECTS:
            result.applied += 1
            self.applied.labels("apple").inc()
            log.warning(
                "reconciliation applied an App Store notification that was never delivered",
                extra={"type": item.notification_type, "outcome": outcome},
            )


class UncheckedAgeCollector(Collector):
    """``coinstore_reconcile_unchecked_age_seconds{source}``: how old the oldest moment is
    that reconciliation has not checked yet (now − the end of its last complete window),
    read at scrape time. Over ``coinstore_reconcile_promise_seconds`` (the promised M
    hours, exported beside it so an alert compares with the deployment's own setting)
    means the promise is broken."""

    def __init__(
        self, cursors: CursorRepository, clock: Clock, lookbacks: dict[str, timedelta], promise: timedelta
    ) -> None:
        self._cursors = cursors
        self._clock = clock
        self._lookbacks = lookbacks
        self._promise = promise

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "coinstore_reconcile_promise_seconds",
            "COINSTORE_RECONCILE_PROMISE_HOURS in seconds: the unchecked age reconciliation promises to stay under",
            value=self._promise.total_seconds(),
        )
        family = GaugeMetricFamily(
            "coinstore_reconcile_unchecked_age_seconds",
            "Age of the oldest moment reconciliation has not checked yet, by source",
            labels=["source"],
        )
        try:
            cursors = {cursor.source: cursor for cursor in self._cursors.all()}
        except SQLAlchemyError:
            cursors = {}
        now = self._clock.now()
        for source, lookback in sorted(self._lookbacks.items()):
            cursor = cursors.get(source)
            checked = cursor.checked_through if cursor is not None else None
            family.add_metric([source], (now - checked if checked is not None else lookback).total_seconds())
        yield family
