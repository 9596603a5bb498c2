"""Cash-outs and payout batches: what the RPCs do, over the store and the wallet port."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy.engine import Connection

from services.common.clock import Clock
from services.common.errors import RequestIdReused
from services.common.failpoints import Failpoints
from services.payouts.domain.model import (
    Batch,
    Cashout,
    CashoutState,
    Destination,
    DestinationChange,
    derived_id,
    reservation_id,
)
from services.payouts.domain.pipeline import PLAN_TASK, Pipeline
from services.payouts.domain.ports import TaskQueue, WalletPort
from services.payouts.domain.rules import Rules, diamonds_for
from services.payouts.errors import FailedPrecondition, NotFound
from services.payouts.store import PayoutStore, RequestKey

log = logging.getLogger(__name__)


class Payouts:
    def __init__(
        self,
        store: PayoutStore,
        wallet: WalletPort,
        rules: Rules,
        clock: Clock,
        queue: TaskQueue,
        pipeline: Pipeline,
        reservation_days: int,
        failpoints: Failpoints | None = None,
    ) -> None:
        self._store = store
        self._wallet = wallet
        self._rules = rules
        self._clock = clock
        self._queue = queue
        self._pipeline = pipeline
        self._hold = timedelta(days=reservation_days)
        self._failpoints = failpoints or Failpoints()

    # -- destinations ----------------------------------------------------------------------------------

    def set_destination(self, key: RequestKey, creator: str, provider: str, receiver: str) -> bytes:
        now = self._clock.now()
        return self._store.in_request(
            key, lambda conn: self._store.set_destination(conn, creator, provider, receiver, now, key.moved_by)
        )

    def verify_destination(self, key: RequestKey, creator: str, provider: str, receiver: str) -> bytes:
        now = self._clock.now()
        return self._store.in_request(
            key, lambda conn: self._store.verify_destination(conn, creator, provider, receiver, now, key.moved_by)
        )

    def destination_history(self, creator: str, limit: int) -> tuple[Destination, list[DestinationChange]]:
        current, changes = self._store.destination_history(creator, limit)
        if current is None:
            raise NotFound(
                "DESTINATION_NOT_FOUND", "the creator has no payout destination", {"creator_account_id": creator}
            )
        return current, changes

    # -- cash-outs -------------------------------------------------------------------------------------

    def request_cashout(
        self, key: RequestKey, creator: str, diamonds: int, destination: Destination | None, currency_code: str
    ) -> bytes:
        """The cash-out row first (RESERVING), then its hold, then the answer: a crash in between
        leaves a row the sweeper finishes, and a retry of the same request asks for the same hold."""
        stored = self._store.replayed(key)
        if stored is not None:
            return stored
        currency = self._rules.currency("currency_code", currency_code)
        verified = self._store.get_destination(creator)
        if verified is None or not verified.verified:
            raise FailedPrecondition(
                "DESTINATION_NOT_VERIFIED",
                "the creator has no verified payout destination",
                {"creator_account_id": creator},
            )
        if destination is not None and (destination.provider, destination.receiver) != (
            verified.provider,
            verified.receiver,
        ):
            raise FailedPrecondition(
                "DESTINATION_MISMATCH", "the destination differs from the creator's verified payout destination"
            )
        amount = self._rules.quote(diamonds, currency)
        rate = self._rules.rate(currency)
        # Only the diamonds the rounded-down amount pays for leave the wallet; the rest stay with the creator.
        charged = diamonds_for(amount, rate, currency)
        now = self._clock.now()
        day = now.date().isoformat()
        limit = self._rules.daily_limit(currency)
        cashout_id = derived_id("co", key.request_id)
        hold = reservation_id(cashout_id, 1)
        row = self._store.begin_cashout(
            {
                "cashout_id": cashout_id,
                "creator_account_id": creator,
                "diamonds": charged,
                "amount_minor": amount,
                "currency": currency,
                "rate": str(rate),
                "provider": verified.provider,
                "receiver": verified.receiver,
                "state": CashoutState.RESERVING.value,
                "attempt": 1,
                "reservation_id": hold,
                "failure_reason": "",
                "provider_item_id": "",
                "provider_transaction_id": "",
                "provider_status": "",
                "wallet_action": None,
                "wallet_done": True,
                "request_day": day,
                "created_at": now,
                "updated_at": now,
                "hold_expire_at": now + self._hold,
                **key.moved_by.columns(),
            },
            limit,
        )
        if (row.creator_account_id, row.currency, row.attempt) != (creator, currency, 1) or row.amount_minor != amount:
            raise RequestIdReused(key.request_id)
        if row.state is CashoutState.RESERVING:
            self._failpoints.hit("payouts.cashout.after_row")
            assert row.hold_expire_at is not None
            try:
                self._wallet.reserve(f"reserve:{hold}", creator, row.diamonds, hold, row.hold_expire_at)
            except FailedPrecondition:
                self._store.drop_reserving(cashout_id)
                raise
        return self._store.in_request(
            key, lambda conn: self._store.finish_reserving(conn, cashout_id, CashoutState.REQUESTED, now)
        )

    def sweep(self) -> None:
        """The periodic sweeper: rows left RESERVING, then the pipeline's own sweep."""
        self.finish_reserving(self._clock.now() - self._pipeline.stuck)
        self._pipeline.sweep()

    def parked(self) -> int:
        return self._store.parked()

    def finish_reserving(self, older_than: datetime) -> int:
        """Sweeper: rows a crash left RESERVING get their hold (the same request to the wallet) and
        move on, or, if the wallet refuses it, end (a new cash-out CANCELLED, a retry FAILED)."""
        finished = 0
        for row in self._store.stale_reserving(older_than):
            if not self._hold_for(row):
                continue
            self._store.finish_reserved(row, self._clock.now())
            if row.attempt > 1:
                self._enqueue_plan(row.batch_id)
            finished += 1
        return finished

    def _hold_for(self, row: Cashout) -> bool:
        """Ask the wallet for a RESERVING row's hold (idempotent); False if it refused (the row ends)."""
        assert row.hold_expire_at is not None
        hold = row.reservation_id
        try:
            self._wallet.reserve(f"reserve:{hold}", row.creator_account_id, row.diamonds, hold, row.hold_expire_at)
        except FailedPrecondition as refusal:
            log.info("cash-out %s: the wallet refused its hold (%s)", row.cashout_id, refusal.reason)
            self._store.refuse_reserving(row.cashout_id, row.attempt, refusal.reason, self._clock.now())
            return False
        return True

    def get_cashout(self, cashout_id: str) -> Cashout:
        found = self._store.get_cashout(cashout_id)
        if found is None:
            raise NotFound("CASHOUT_NOT_FOUND", "no such cash-out", {"cashout_id": cashout_id})
        return found

    def list_cashouts(self, creator: str, size: int, token: str) -> tuple[list[Cashout], str]:
        return self._store.list_cashouts(creator, size, token)

    def cancel_cashout(self, key: RequestKey, cashout_id: str) -> bytes:
        now = self._clock.now()
        response = self._store.in_request(key, lambda conn: self._store.cancel_cashout(conn, cashout_id, now))
        # The wallet outbox: release now; the sweeper retries if the wallet is unreachable.
        self._pipeline.settle(self._pipeline.pending_settlement(cashout_id))
        return response

    # -- batches ---------------------------------------------------------------------------------------

    def preview_batch(self, currency_code: str, cutoff: datetime | None, max_items: int) -> tuple[str, int, int, int]:
        currency = self._rules.currency("currency_code", currency_code)
        count, diamonds, amount = self._store.preview_batch(currency, cutoff or self._clock.now(), max_items)
        return currency, count, diamonds, amount

    def create_batch(
        self, key: RequestKey, currency_code: str, cutoff: datetime | None, max_items: int
    ) -> tuple[bytes, str]:
        currency = self._rules.currency("currency_code", currency_code)
        now = self._clock.now()
        batch_id = derived_id("pb", key.request_id)
        response = self._store.in_request(
            key,
            lambda conn: self._store.create_batch(
                conn, batch_id, currency, cutoff or now, max_items, now, key.moved_by
            ),
        )
        self._enqueue_plan(batch_id)
        return response, batch_id

    def get_batch(self, batch_id: str) -> Batch:
        return self._store.get_batch(batch_id)

    def list_batches(self, size: int, token: str) -> tuple[list[Batch], str]:
        return self._store.list_batches(size, token)

    def list_batch_items(self, batch_id: str, size: int, token: str) -> tuple[list[Cashout], str]:
        self._store.get_batch(batch_id)
        return self._store.list_batch_items(batch_id, size, token)

    def retry_failed(self, key: RequestKey, batch_id: str) -> bytes:
        """Each FAILED item's next attempt row first (RESERVING), then its hold, then the answer."""
        stored = self._store.replayed(key)
        if stored is not None:
            return stored
        now = self._clock.now()
        self._store.begin_retry(batch_id, self._store.retry_candidates(batch_id), now + self._hold, now)
        ready: list[str] = []
        # Also the attempts an earlier, interrupted try of this request (or any) left reserving.
        for item in self._store.reserving_of(batch_id):
            assert item.hold_expire_at is not None
            hold = item.reservation_id
            self._failpoints.hit("payouts.retry.after_row")
            try:
                self._wallet.reserve(
                    f"reserve:{hold}", item.creator_account_id, item.diamonds, hold, item.hold_expire_at
                )
            except FailedPrecondition as refusal:
                log.info("not retrying %s: the wallet refused a new hold (%s)", item.cashout_id, refusal.reason)
                self._store.refuse_reserving(item.cashout_id, item.attempt, refusal.reason, self._clock.now())
                continue
            ready.append(item.cashout_id)

        def work(conn: Connection) -> tuple[int, Batch]:
            moved = self._store.finish_retry(conn, batch_id, ready, self._clock.now())
            return moved, self._store.batch(conn, batch_id)

        response = self._store.in_request(key, work)
        self._enqueue_plan(batch_id)
        return response

    def cancel_batch(self, key: RequestKey, batch_id: str) -> bytes:
        now = self._clock.now()
        return self._store.in_request(key, lambda conn: self._store.cancel_batch(conn, batch_id, now))

    def _enqueue_plan(self, batch_id: str) -> None:
        try:
            self._queue.enqueue(PLAN_TASK, batch_id)
        except Exception as exc:  # the broker is down: the sweeper starts the batch later
            log.warning("could not queue batch %s (the sweeper will): %s", batch_id, exc)
