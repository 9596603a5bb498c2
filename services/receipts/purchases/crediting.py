"""The one exactly-once crediting path, shared by every store path and the
notification inbox.

``Crediting.credit(purchase, claim)``:
1. computes the terms (pack coins × quantity, promotion bonus at purchase time,
   region policy) — UNKNOWN_PRODUCT / REGION_MISMATCH refuse here;
2. records the purchase (the outbox, see outbox.py) and binds it to the first
   account that claims it, in a committed transaction, before the wallet hears
   of it (another account → PERMISSION_DENIED ``RECEIPT_BOUND_TO_OTHER_ACCOUNT``);
   revoked or pending purchases stop here with nothing credited;
3. calls the wallet's CreditPurchase with the terms stored at first record (the
   wallet credits once per (store, store_transaction_id) and answers
   ALREADY_CREDITED to repeats);
4. marks the row CREDITED.
Steps 2 and 4 are group commits shared by concurrent calls, step 3 one
CreditPurchases call for them. A crash between 2 and 3 or between 3 and 4 is
harmless: the sweep (``credit_uncredited``, on the worker's beat) or the next
call repeats 3 (a no-op in the wallet if it had credited) and finishes 4. Tests
crash exactly there with the failpoints ``receipts.credit.before_wallet`` and
``receipts.credit.after_wallet``.

``reverse``/``restore`` drive the wallet's state-based ReversePurchase and
RestorePurchase for refunds and refund reversals; ``apply_refund`` is how the
stores' reports (notifications, reconciliation) reach ``reverse``.

Refunds are kept against the purchase key (``receipts_refunds``) before anything
else, even when the purchase is unknown or not credited yet. ``credit`` reads them
twice, each time in the group-committed transaction of steps 2 and 4: before the
row is written (a fully refunded purchase is recorded REVOKED and never credited)
and after it is marked, the wallet having credited (a refund recorded meanwhile is
reversed here). ``apply_refund`` records the refund, then asks the wallet to reverse: one of
the two always sees the other, so a refund racing a credit is never lost.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import InitVar, dataclass, field
from datetime import timedelta

from prometheus_client import Counter

from services.common.catalog import Catalog, StoreId
from services.common.clock import Clock
from services.common.errors import DomainError
from services.common.failpoints import Failpoints
from services.common.metrics import Metrics
from services.receipts.config import RegionPolicy
from services.receipts.errors import NotFound
from services.receipts.purchases.model import (
    Claim,
    CreditTerms,
    Environment,
    Outcome,
    PurchaseRecord,
    PurchaseResult,
    Refund,
    ReversalResult,
    StoredState,
    VerifiedPurchase,
)
from services.receipts.purchases.outbox import OutboxRepository, PurchaseBatches, Recording, Settlement
from services.receipts.purchases.refunds import RefundRepository
from services.receipts.purchases.repository import Call, CreditHook, PurchaseRepository, RequestRecorder, RowHook
from services.receipts.purchases.rules import (
    SandboxPolicy,
    already_refunded,
    check_sandbox,
    credit_terms,
    normalize_account_region,
)
from services.receipts.purchases.wallet import Credit, WalletClient, refusal_reason

log = logging.getLogger(__name__)

# The sweep's AIP-155 id for the wallet (the wallet's request id also names the purchase).
SWEEP_REQUEST_ID = "receipts-credit-sweep"
_NOT_CREDITABLE = {StoredState.REVOKED: Outcome.REVOKED, StoredState.PENDING: Outcome.PENDING}
_CREDITED = (StoredState.CREDITED, StoredState.REFUNDED)


def _purchase_of(record: PurchaseRecord) -> VerifiedPurchase:
    """The purchase as it was recorded (the sweep credits it from its row alone)."""
    return VerifiedPurchase(
        store=record.store,
        store_transaction_id=record.store_transaction_id,
        product_id=record.product_id,
        quantity=record.quantity,
        environment=record.environment,
        storefront=record.storefront,
        price=record.price,
        purchase_time=record.purchase_time,
        order_id=record.order_id,
        original_transaction_id=record.original_transaction_id,
        evidence_sha256=record.evidence_sha256,
    )


def _everyone() -> SandboxPolicy:
    return SandboxPolicy(everyone=True)


@dataclass(eq=False)
class Crediting:
    """The use cases: credit, record, reverse (apply_refund), restore."""

    purchases: PurchaseRepository
    refunds: RefundRepository
    wallet: WalletClient
    catalog: Catalog
    region_policy: RegionPolicy
    clock: Clock
    metrics: InitVar[Metrics]
    failpoints: Failpoints = field(default_factory=Failpoints)
    sandbox: SandboxPolicy = field(default_factory=_everyone)
    # The outbox's group commits; None: each purchase in transactions of its own.
    batches: PurchaseBatches = None  # type: ignore[assignment]
    # Purchases the sweep has in flight at once (wiring: one group commit's worth).
    sweep_wave: int = 128
    _credits: Counter = field(init=False)
    _swept: Counter = field(init=False)
    _credit_children: dict[tuple[StoreId, Environment, Outcome], Counter] = field(init=False, default_factory=dict)

    def __post_init__(self, metrics: Metrics) -> None:
        if self.batches is None:
            self.batches = PurchaseBatches(OutboxRepository(self.purchases))
        self._credits = metrics.counter(
            "coinstore_receipts_purchases",
            "Store purchases verified, by store, environment and outcome",
            ("store", "environment", "outcome"),
        )
        self._swept = metrics.counter(
            "coinstore_receipts_credit_sweep",
            "Recorded purchases the sweep had the wallet credit, by outcome (credited, already_credited;"
            " refused: the wallet refused for good, the row is marked refused; retry: left for the next sweep)",
            ("outcome",),
        )

    async def credit(self, purchase: VerifiedPurchase, claim: Claim, hook: CreditHook | None = None) -> PurchaseResult:
        """Have the wallet credit ``purchase`` once, to the claiming account. A ``hook``
        (the AIP-155 answer, the Play consumption row) commits with the purchase row."""
        account_id = claim.account_id
        check_sandbox(self.sandbox, purchase, account_id)
        if purchase.revoked:
            await self._record_revocation(purchase)
        now = self.clock.now()
        region = normalize_account_region(claim.account_region)
        terms = credit_terms(self.catalog, purchase, now, self.region_policy, region)
        # Recorded (bound, terms fixed) before the wallet hears of it: the outbox. The batch
        # reads the recorded refund first: a full one records the purchase REVOKED.
        recorded = await self.batches.record(Recording(terms, account_id, now, _call_of(hook)))
        record = recorded.record
        if recorded.refund is not None and recorded.refund.full:
            purchase = purchase.as_revoked()
        if record.state in _NOT_CREDITABLE:
            return self._count(PurchaseResult(_NOT_CREDITABLE[record.state], record, 0, 0, 0))
        # The terms fixed when the purchase was first recorded win.
        terms = CreditTerms(purchase, record.coins, record.bonus_coins, record.flagged_for_review)
        self.failpoints.hit("receipts.credit.before_wallet")
        credit = await self.wallet.credit(terms, account_id, claim.request_id)
        # The wallet has credited; the purchase row does not say so yet.
        self.failpoints.hit("receipts.credit.after_wallet")
        result, late = await self._settle(terms, account_id, credit, hook)
        reversal = await self._reverse_late_refund(late, claim.request_id)
        if reversal is not None:
            return self._refunded(reversal.record or result.record, reversal.new_balance)
        return self._count(result)

    async def _reverse_late_refund(self, late: Refund | None, request_id: str) -> ReversalResult | None:
        """``late``: the refund read after the wallet credited (in the settle transaction, after
        marking). A refund recorded before that read (one arriving now, or a revocation seen
        while verifying a purchase credited before) is reversed here; one recorded after it
        finds the credit in the wallet (apply_refund)."""
        if late is None:
            return None
        return await self.reverse(late, request_id=f"{request_id}:refunded"[:128])

    async def _settle(
        self, terms: CreditTerms, account_id: str, credit: Credit, hook: CreditHook | None = None
    ) -> tuple[PurchaseResult, Refund | None]:
        outcome = Outcome.CREDITED if credit.new else Outcome.ALREADY_CREDITED

        def result_for(record: PurchaseRecord) -> PurchaseResult:
            state = Outcome.REFUNDED if record.state is StoredState.REFUNDED else outcome
            return PurchaseResult(state, record, record.coins + record.bonus_coins, record.bonus_coins, credit.balance)

        settlement = Settlement(terms, account_id, credit.wallet_transaction_id, self.clock.now(), result_for, hook)
        settled = await self.batches.settle(settlement)
        return result_for(settled.record), settled.refund

    async def credit_uncredited(self, grace: timedelta, limit: int = 1000) -> int:
        """The sweep: credit every bound purchase recorded at least ``grace`` ago that is
        not marked credited (a crash between record and mark, a caller that gave up),
        with its recorded terms and evidence. The wallet credits each once whoever asks; the
        number of purchases marked is returned. A row the wallet refuses for good (see
        :func:`refusal_reason`) is marked REFUSED with the reason and not swept again; any
        other failure leaves it for the next sweep."""
        records = await self.batches.outbox.database.run(
            self.batches.outbox.uncredited, self.clock.now() - grace, limit
        )

        async def one(record: PurchaseRecord) -> bool:
            account_id = record.account_id
            assert account_id is not None
            terms = CreditTerms(_purchase_of(record), record.coins, record.bonus_coins, record.flagged_for_review)
            credit: Credit | None = None
            try:
                credit = await self.wallet.credit(terms, account_id, SWEEP_REQUEST_ID)
                _, late = await self._settle(terms, account_id, credit)
                await self._reverse_late_refund(late, f"{SWEEP_REQUEST_ID}:{record.store_transaction_id}")
            except DomainError as error:
                reason = refusal_reason(error) if credit is None else None
                refused = reason is not None and await self.batches.outbox.database.run(
                    self.batches.outbox.refuse, record, reason, self.clock.now()
                )
                log.warning(
                    "sweep: %s %s not credited (%s): %s",
                    record.store.value,
                    record.store_transaction_id,
                    "refused, not retried" if refused else "retried next sweep",
                    error.reason,
                )
                self._swept.labels("refused" if refused else "retry").inc()
                return False
            self._swept.labels("credited" if credit.new else "already_credited").inc()
            return True

        # In waves: a sweep of a long backlog must not open a wallet call and a transaction per row at once.
        marked = 0
        for start in range(0, len(records), self.sweep_wave):
            wave = records[start : start + self.sweep_wave]
            marked += sum(await asyncio.gather(*(one(record) for record in wave)))
        return marked

    async def _record_revocation(self, purchase: VerifiedPurchase) -> None:
        """Record the revocation the store's report carries (a credit after this sees it)."""
        store, key = purchase.store, purchase.store_transaction_id
        revocation = purchase.refund or Refund(store, key, purchase.environment, full=True, reason="revoked")
        await self.refunds.record(revocation, self.clock.now())

    def _refunded(self, record: PurchaseRecord, balance: int) -> PurchaseResult:
        outcome = Outcome.REVOKED if record.state is StoredState.REVOKED else Outcome.REFUNDED
        return self._count(PurchaseResult(outcome, record, 0, 0, balance))

    async def record(self, purchase: VerifiedPurchase) -> PurchaseRecord:
        """Record a purchase no account has claimed yet (e.g. from a store
        notification); the first account to verify it later owns it."""
        if purchase.revoked:
            await self._record_revocation(purchase)
        now = self.clock.now()
        terms = credit_terms(self.catalog, purchase, now, RegionPolicy.ALLOW, "")
        # The outbox's batch reads the recorded refund with the write: a full one records it REVOKED.
        return (await self.batches.record(Recording(terms, None, now))).record

    async def _environment(
        self, store: StoreId, store_transaction_id: str, environment: Environment | None
    ) -> Environment:
        """The purchase key's environment: the caller's (a notification says it), else the recorded purchase's."""
        if environment is not None:
            return environment
        record = await self.purchases.get(store, store_transaction_id)
        return record.environment if record is not None else Environment.PRODUCTION

    async def apply_refund(self, refund: Refund, *, request_id: str) -> bool:
        """A store reports ``refund`` (a notification, reconciliation): :meth:`reverse` it,
        unless the purchase row already records this cumulative refund -- asked again with
        the same request id, the wallet would replay its first answer, "applied". True when
        this call moved coins; a purchase the wallet does not know moves nothing."""
        if not (refund.full or refund.refunded_quantity or refund.refunded_percentage_milli):
            return False
        # Recorded first, whatever the purchase's state: a credit after this sees it.
        await self.refunds.record(refund, self.clock.now())
        record = await self.purchases.get(refund.store, refund.store_transaction_id)
        if record is not None and already_refunded(record, refund):
            return False
        if refund.full and record is not None and record.state not in _CREDITED:
            await self.purchases.revoke_uncredited(refund.store, refund.store_transaction_id, self.clock.now())
        try:
            result = await self.reverse(refund, request_id=request_id)
        except NotFound:
            # Not credited (yet): the recorded refund keeps it from ever being credited.
            return False
        return result.applied

    async def reverse(self, refund: Refund, *, request_id: str) -> ReversalResult:
        """Claw back a refunded purchase. State-based: ``full``, or the cumulative refunded
        quantity, or the cumulative ``refunded_percentage_milli``; the same refund reported
        twice moves coins once. A partial refund that computes to nothing moves nothing
        (``nothing_refunded``): report it again when the store's figures change."""
        store, store_transaction_id, full = refund.store, refund.store_transaction_id, refund.full
        environment = await self._environment(store, store_transaction_id, refund.environment)
        reversal = await self.wallet.reverse(refund, environment, request_id)
        if reversal.nothing_refunded:
            return ReversalResult(False, 0, reversal.account_id, reversal.balance, None, nothing_refunded=True)
        quantity, share = (0, 0) if full else (refund.refunded_quantity, refund.refunded_percentage_milli)
        now = self.clock.now()
        record = await self.purchases.mark_refund(store, store_transaction_id, quantity, share, now)
        return ReversalResult(reversal.applied, reversal.coins_moved, reversal.account_id, reversal.balance, record)

    async def restore(
        self,
        store: StoreId,
        store_transaction_id: str,
        *,
        environment: Environment | None = None,
        reason: str = "",
        request_id: str,
    ) -> ReversalResult:
        """Undo the reversals of a purchase whose refund the store reversed."""
        key = await self._environment(store, store_transaction_id, environment)
        # The store withdrew its refund: a later credit of the purchase must not reverse it again.
        await self.refunds.withdraw(store, store_transaction_id)
        restored = await self.wallet.restore(store, store_transaction_id, key, reason, request_id)
        record = await self.purchases.mark_restored(store, store_transaction_id, self.clock.now())
        return ReversalResult(restored.applied, restored.coins_moved, restored.account_id, restored.balance, record)

    def _count(self, result: PurchaseResult) -> PurchaseResult:
        record = result.record
        key = (record.store, record.environment, result.outcome)
        child = self._credit_children.get(key)
        if child is None:
            # .labels() costs a lock and a tuple of strings per call: a tenth of the core's CPU.
            child = self._credit_children[key] = self._credits.labels(
                record.store.value, record.environment.value, result.outcome.value
            )
        child.inc()
        return result


def _call_of(hook: CreditHook | None) -> Call | None:
    """The AIP-155 call whose answer ``hook`` records (wrapped in a Play row or not)."""
    while isinstance(hook, RowHook):
        hook = hook.inner
    return hook.call if isinstance(hook, RequestRecorder) else None
