"""The batch pipeline the Celery tasks run: plan → submit → poll → settle, and the sweeper.

Every step re-reads its state from the database and moves it with conditional
UPDATEs, so any step may run twice, concurrently, or after a killed worker:
the provider sees each submission id once (it deduplicates ``sender_batch_id``),
the wallet sees each commit/release under one deterministic request id.

Named failpoints (services/common/failpoints.py) mark the places where a crash
costs the most, so crash tests can kill a worker exactly there:

- ``payouts.submit.after_provider``: the provider accepted (and may be paying) a
  submission we have not yet recorded as submitted;
- ``payouts.poll.before_settle``: the provider's item results are recorded, the
  wallet has not yet heard of them;
- ``payouts.settle.after_wallet``: the wallet committed/released, the outbox
  rows are not yet marked settled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from services.common.clock import Clock
from services.common.failpoints import Failpoints
from services.payouts.domain.model import BatchState, ChunkState, PayoutLine, Settlement, parse_sender_item_id
from services.payouts.domain.ports import (
    ItemOutcome,
    PayoutProvider,
    ProviderAmbiguous,
    ProviderRejected,
    ProviderUnavailable,
    TaskQueue,
    WalletPort,
)
from services.payouts.domain.rules import requote
from services.payouts.errors import Unavailable
from services.payouts.store import PayoutStore

log = logging.getLogger(__name__)

SUBMIT_TASK = "payouts.submit_chunk"
POLL_TASK = "payouts.poll_chunk"
PLAN_TASK = "payouts.plan_batch"


class Pipeline:
    def __init__(
        self,
        store: PayoutStore,
        provider: PayoutProvider,
        wallet: WalletPort,
        queue: TaskQueue,
        clock: Clock,
        *,
        chunk_size: int,
        poll_seconds: float,
        stuck_seconds: float,
        settle_concurrency: int,
        max_countdown: float,
        minimum_diamonds: int,
        hold_margin_seconds: float,
        park_after: int,
        failpoints: Failpoints | None = None,
    ) -> None:
        self._store = store
        self._provider = provider
        self._wallet = wallet
        self._queue = queue
        self._clock = clock
        self._chunk_size = min(chunk_size, provider.max_items_per_submission)
        self._poll = min(poll_seconds, max_countdown)
        self._stuck = timedelta(seconds=stuck_seconds)
        self._concurrency = settle_concurrency
        self._minimum = minimum_diamonds
        self._margin = timedelta(seconds=hold_margin_seconds)
        self._park_after = park_after
        self._failpoints = failpoints or Failpoints()

    @property
    def stuck(self) -> timedelta:
        return self._stuck

    def plan_batch(self, batch_id: str) -> None:
        now = self._clock.now()
        if self._store.start_batch(batch_id, now, now + self._stuck) is not BatchState.SUBMITTED:
            return
        queued: set[str] = set()
        # Each submission is queued as soon as it is planned, so paying starts while the rest is planned.
        # The unplanned items are read once (one scan, however stale the table's statistics),
        # then planned slice by slice; a concurrent planner's items are skipped by each slice.
        ids = self._store.unplanned(batch_id)
        for start in range(0, len(ids), self._chunk_size):
            chunk_id = self._store.plan_chunk(batch_id, ids[start : start + self._chunk_size], now, now + self._stuck)
            if chunk_id is not None:
                self._queue.enqueue(SUBMIT_TASK, chunk_id)
                queued.add(chunk_id)
        for chunk_id in self._store.chunk_ids(batch_id, ChunkState.PENDING):
            if chunk_id not in queued:
                self._queue.enqueue(SUBMIT_TASK, chunk_id)
        self._store.finish_batch(batch_id, now)

    def submit_chunk(self, chunk_id: str) -> None:
        """Send one submission to the provider. ProviderUnavailable propagates: the task retries it unchanged.

        Just before each provider call the wallet marks the submission's holds SUBMITTED (one
        call): from then on they cannot lapse or shrink. Items whose holds it refuses were never
        sent (every provider call follows a successful marking), so they leave the submission:
        expired, re-quoted, or cancelled (CLAWED_BACK)."""
        chunk = self._store.chunk(chunk_id)
        if chunk is None or chunk.state in (ChunkState.DONE, ChunkState.PARKED):
            return
        now = self._clock.now()
        if chunk.state is ChunkState.SUBMITTED:
            self._queue.enqueue(POLL_TASK, chunk_id)
            return
        self._store.touch_chunk(chunk_id, now + self._stuck)
        lines = self._mark_holds(chunk_id, chunk.lines, now)
        if lines is None:
            return  # parked for ops: nothing is sent
        if not lines:
            # Nothing left to pay: close it like a submission whose items all settled.
            self._store.mark_submitted(chunk_id, "", now, now + self._stuck)
            self.poll_chunk(chunk_id)
            return
        attempt = self._store.claim_attempt(chunk_id, now, now + self._stuck)
        if attempt is None:
            return
        try:
            provider_batch_id = self._provider.submit(chunk_id, lines)
        except ProviderRejected as rejected:
            # Only the refusal of the first and only call proves the provider created nothing.
            if attempt == 1 and self._store.fail_first_attempt(chunk_id, rejected.reason, "REJECTED", now):
                log.error("provider refused submission %s: %s", chunk_id, rejected)
                self.poll_chunk(chunk_id)
                return
            self._ambiguous(chunk_id, f"attempt {attempt} refused ({rejected.reason}): {rejected}")
            raise ProviderUnavailable(f"refusal of a repeated submission {chunk_id} proves nothing") from None
        except ProviderAmbiguous as unclear:
            self._ambiguous(chunk_id, str(unclear))
            raise
        self._failpoints.hit("payouts.submit.after_provider")
        self._store.mark_submitted(chunk_id, provider_batch_id, now, now + self._stuck + timedelta(seconds=self._poll))
        self._queue.enqueue(POLL_TASK, chunk_id, countdown=self._poll)

    def _mark_holds(self, chunk_id: str, lines: Sequence[PayoutLine], now: datetime) -> Sequence[PayoutLine] | None:
        """SUBMITTED for every hold of the submission, in one wallet call; returns the lines still
        to pay, or None when the submission was parked for ops instead."""
        answers = self._wallet.submit([(line.reservation_id, line.diamonds) for line in lines])
        refused = [(line, answer) for line, answer in zip(lines, answers, strict=True) if answer.refusal]
        if not refused:
            return lines
        committed = [line for line, answer in refused if answer.refusal == "RESERVATION_ALREADY_COMMITTED"]
        if committed:
            # A hold committed means its diamonds were paid out already, through some other
            # submission: sending this one could pay them twice. Nothing is sent, released
            # or failed; ops look (the parked gauge).
            holds = ", ".join(line.reservation_id for line in committed[:5])
            reason = f"{len(committed)} hold(s) already committed before this submission: {holds}"
            if self._store.park(chunk_id, reason, now):
                log.error("submission %s parked for ops review: %s", chunk_id, reason)
            return None
        expired: list[str] = []
        requoted: list[tuple[str, int, int]] = []
        cancelled: list[str] = []
        for line, answer in refused:
            if answer.refusal == "RESERVATION_SHRUNK":
                quote = requote(answer.diamonds, Decimal(line.rate), line.currency, self._minimum)
                if quote is None:
                    cancelled.append(line.cashout_id)
                else:
                    requoted.append((line.cashout_id, *quote))
            else:
                expired.append(line.cashout_id)
        log.warning(
            "submission %s: %d holds expired, %d shrunk (re-quoted), %d clawed back (cancelled)",
            chunk_id,
            len(expired),
            len(requoted),
            len(cancelled),
        )
        self._store.prune_chunk(chunk_id, expired, requoted, cancelled, now)
        if expired or cancelled:  # a re-quote alone leaves nothing for the wallet to settle
            self.settle(self._store.settlements(cashout_ids=[*expired, *cancelled]))
        chunk = self._store.chunk(chunk_id)
        return chunk.lines if chunk is not None else ()

    def _ambiguous(self, chunk_id: str, reason: str) -> None:
        if self._store.note_ambiguous(chunk_id, reason, self._park_after, self._clock.now()):
            log.error("submission %s parked for ops review after ambiguous answers: %s", chunk_id, reason)
        else:
            log.warning("submission %s: ambiguous answer, retried: %s", chunk_id, reason)

    def poll_chunk(self, chunk_id: str) -> bool:
        """Take the provider's item results, settle them in the wallet; True once the chunk is done."""
        chunk = self._store.chunk(chunk_id)
        if chunk is None:
            return True
        if chunk.state is ChunkState.PENDING:
            self._queue.enqueue(SUBMIT_TASK, chunk_id)
            return False
        now = self._clock.now()
        started = time.perf_counter()
        if chunk.state is ChunkState.SUBMITTED and chunk.provider_batch_id:
            self._store.touch_chunk(chunk_id, now + self._stuck + timedelta(seconds=self._poll))
            self._record(chunk_id, chunk.provider_batch_id, {(line.cashout_id, line.attempt) for line in chunk.lines})
        recorded = time.perf_counter()
        settlements = self._store.settlements(chunk_id=chunk_id)
        if settlements:
            self._failpoints.hit("payouts.poll.before_settle")
        settled = self.settle(settlements)
        wallet = time.perf_counter()
        chunk_done, _batch_done = self._store.finish_chunk(chunk_id, chunk.batch_id, self._clock.now())
        log.info(
            "polled %s: results %.2fs, %d settled in %.2fs, finish %.2fs",
            chunk_id,
            recorded - started,
            settled,
            wallet - recorded,
            time.perf_counter() - wallet,
        )
        if not chunk_done:
            self._queue.enqueue(POLL_TASK, chunk_id, countdown=self._poll)
        return chunk_done

    def _record(self, chunk_id: str, provider_batch_id: str, lines: set[tuple[str, int]]) -> None:
        started = time.perf_counter()
        result = self._provider.batch(provider_batch_id)
        fetched = time.perf_counter()
        paid: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        pending: list[dict[str, Any]] = []
        seen: set[tuple[str, int]] = set()
        for item in result.items:
            parsed = parse_sender_item_id(item.sender_item_id)
            if parsed is None or parsed not in lines:
                continue
            seen.add(parsed)
            outcome = item.outcome
            if outcome is ItemOutcome.UNCLAIMED:
                # The money sits with the receiver until claimed; take it back before returning the diamonds.
                outcome = ItemOutcome.FAILED if self._provider.cancel_unclaimed(item.provider_item_id) else outcome
            params = _params(parsed[0], parsed[1], item.provider_item_id, item.transaction_id, item.status, item.reason)
            if outcome is ItemOutcome.PAID:
                paid.append(params)
            elif outcome is ItemOutcome.FAILED:
                failed.append(params)
            else:
                pending.append(params)
        if result.denied:
            failed.extend(_params(c, a, "", "", result.status, "BATCH_DENIED") for c, a in lines - seen)
        self._store.record_results(chunk_id, paid, failed, pending, self._clock.now())
        log.info(
            "results of %s: provider %.2fs, %d paid recorded in %.2fs",
            chunk_id,
            fetched - started,
            len(paid),
            time.perf_counter() - fetched,
        )

    def pending_settlement(self, cashout_id: str) -> list[Settlement]:
        return self._store.settlements(cashout_ids=[cashout_id])

    def settle(self, settlements: Sequence[Settlement]) -> int:
        """Commit paid and release failed reservations, one wallet call per submission-sized
        part (each item under its own request id); returns how many the wallet settled."""
        if not settlements:
            return 0
        parts = [settlements[i : i + self._chunk_size] for i in range(0, len(settlements), self._chunk_size)]

        def one(part: Sequence[Settlement]) -> list[tuple[str, str]]:
            try:
                answers = self._wallet.settle(part)
            except Unavailable as exc:
                log.warning("wallet unavailable settling %d items (retried later): %s", len(part), exc)
                return []
            done = []
            for item, refusal in zip(part, answers, strict=True):
                if refusal is None:
                    continue
                if refusal:
                    log.error(
                        "wallet refused to %s reservation %s of cash-out %s: %s (needs review)",
                        item.action.value.lower(),
                        item.reservation_id,
                        item.cashout_id,
                        refusal,
                    )
                done.append((item.cashout_id, item.reservation_id))
            return done

        if len(parts) == 1:
            results = [one(parts[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(self._concurrency, len(parts))) as pool:
                results = list(pool.map(one, parts))
        done = [pair for result in results for pair in result]
        self._failpoints.hit("payouts.settle.after_wallet")
        self._store.mark_settled(done, self._clock.now())
        return len(done)

    def sweep(self) -> tuple[int, int, int]:
        """Expire cash-outs whose holds would lapse before submission; re-queue work whose messages
        were lost; returns (batches, chunks, settlements) touched."""
        now = self._clock.now()
        expired = self._store.expire_unsent(now + self._margin, now)
        if expired:
            log.warning("expired %d cash-outs whose holds would lapse before submission", len(expired))
            self.settle(self._store.settlements(cashout_ids=expired))
        batch_ids, chunk_list = self._store.due_work(now, now + self._stuck)
        for batch_id in batch_ids:
            self._queue.enqueue(PLAN_TASK, batch_id)
        for chunk_id, state in chunk_list:
            self._queue.enqueue(SUBMIT_TASK if state == ChunkState.PENDING.value else POLL_TASK, chunk_id)
        settled = self.settle(self._store.settlements(older_than=now - self._stuck))
        if batch_ids or chunk_list or settled:
            log.info(
                "sweeper re-queued %d batches, %d submissions; settled %d", len(batch_ids), len(chunk_list), settled
            )
        return len(batch_ids), len(chunk_list), settled


def _params(cashout_id: str, attempt: int, item_id: str, txn: str, status: str, reason: str) -> dict[str, Any]:
    return {
        "b_id": cashout_id,
        "b_attempt": attempt,
        "b_item": item_id[:64],
        "b_txn": txn[:64],
        "b_status": status[:32],
        "b_reason": reason[:256],
    }
