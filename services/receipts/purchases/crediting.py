"""The one exactly-once crediting path, shared by every store path and the
notification inbox.

``Crediting.credit(purchase, account_id, …)``:
1. computes the terms (pack coins × quantity, promotion bonus at purchase time,
   region policy) — UNKNOWN_PRODUCT / REGION_MISMATCH refuse here;
2. records the purchase and binds it to the first account that claims it, in
   the database (another account → PERMISSION_DENIED
   ``RECEIPT_BOUND_TO_OTHER_ACCOUNT``); revoked or pending purchases stop here
   with nothing credited;
3. calls the wallet's CreditPurchase with the terms stored at first claim (the
   wallet credits once per (store, store_transaction_id) and answers
   ALREADY_CREDITED to repeats);
4. marks the row CREDITED.
A crash between 3 and 4 is harmless: the next call repeats 3 (a no-op in the
wallet) and finishes 4. Tests crash exactly there with the failpoints
``receipts.credit.before_wallet`` and ``receipts.credit.after_wallet``.

``reverse``/``restore`` drive the wallet's state-based ReversePurchase and
RestorePurchase for refunds and refund reversals; ``apply_refund`` is how the
stores' reports (notifications, reconciliation) reach ``reverse``.
"""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.engine import Connection

from coinstore.type.v1 import money_pb2
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common.catalog import Catalog, StoreId
from services.common.clock import Clock
from services.common.failpoints import Failpoints
from services.common.metrics import Metrics
from services.receipts.config import RegionPolicy
from services.receipts.errors import NotFound, PermissionDenied
from services.receipts.purchases.model import (
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
from services.receipts.purchases.repository import PurchaseRepository, RequestRecorder
from services.receipts.purchases.rules import (
    SandboxPolicy,
    already_refunded,
    check_sandbox,
    credit_terms,
    normalize_account_region,
)
from services.receipts.purchases.wallet import WalletClient, wallet_request_id

WALLET_STORE = {StoreId.APP_STORE: wpb.STORE_APP_STORE, StoreId.GOOGLE_PLAY: wpb.STORE_GOOGLE_PLAY}
WALLET_ENVIRONMENT = {
    Environment.PRODUCTION: wpb.STORE_ENVIRONMENT_PRODUCTION,
    Environment.SANDBOX: wpb.STORE_ENVIRONMENT_SANDBOX,
}
_NOT_CREDITABLE = {StoredState.REVOKED: Outcome.REVOKED, StoredState.PENDING: Outcome.PENDING}


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class Crediting:
    def __init__(
        self,
        purchases: PurchaseRepository,
        wallet: WalletClient,
        catalog: Catalog,
        region_policy: RegionPolicy,
        clock: Clock,
        metrics: Metrics,
        failpoints: Failpoints | None = None,
        sandbox: SandboxPolicy | None = None,
    ) -> None:
        self._purchases = purchases
        self._wallet = wallet
        self._catalog = catalog
        self._region_policy = region_policy
        self.sandbox = sandbox or SandboxPolicy(everyone=True)
        self._clock = clock
        self._failpoints = failpoints or Failpoints()
        self._credits = metrics.counter(
            "coinstore_receipts_purchases",
            "Store purchases verified, by store, environment and outcome",
            ("store", "environment", "outcome"),
        )

    async def credit(
        self,
        purchase: VerifiedPurchase,
        account_id: str,
        *,
        request_id: str,
        account_region: str = "",
        recorder: RequestRecorder | None = None,
    ) -> PurchaseResult:
        """Have the wallet credit ``purchase`` once, to ``account_id``.

        ``request_id`` is the caller's AIP-155 id; it only distinguishes calls
        (the wallet's own key is the store transaction). A ``recorder`` gets the
        result recorded in the same transaction as the purchase.
        """
        check_sandbox(self.sandbox, purchase, account_id)
        now = self._clock.now()
        region = normalize_account_region(account_region)
        terms = credit_terms(self._catalog, purchase, now, self._region_policy, region)
        existing = await self._purchases.get(purchase.store, purchase.store_transaction_id)
        if existing is not None and existing.account_id not in (None, account_id):
            raise PermissionDenied(
                "RECEIPT_BOUND_TO_OTHER_ACCOUNT",
                "this purchase was already claimed by another account",
                {"store_transaction_id": purchase.store_transaction_id},
            )
        if existing is not None:
            # The terms fixed when the purchase was first recorded win.
            # A purchase recorded from a notification is judged by its first claimer's region.
            flagged = existing.flagged_for_review or (existing.account_id is None and terms.flagged_for_review)
            terms = CreditTerms(purchase, existing.coins, existing.bonus_coins, flagged)
        if purchase.revoked or purchase.pending or (existing is not None and existing.state in _NOT_CREDITABLE):
            record = await self._purchases.claim(terms, account_id, now)
            if record.state in _NOT_CREDITABLE:
                return self._count(PurchaseResult(_NOT_CREDITABLE[record.state], record, 0, 0, 0))
        self._failpoints.hit("receipts.credit.before_wallet")
        response = await self._wallet.credit(self._credit_request(terms, account_id, request_id))
        # The wallet has credited; the purchase row does not say so yet.
        self._failpoints.hit("receipts.credit.after_wallet")
        if response.state == wpb.CREDIT_STATE_CREDITED:
            outcome = Outcome.CREDITED
        else:
            outcome = Outcome.ALREADY_CREDITED

        def result_for(record: PurchaseRecord) -> PurchaseResult:
            state = Outcome.REFUNDED if record.state is StoredState.REFUNDED else outcome
            return PurchaseResult(
                state, record, record.coins + record.bonus_coins, record.bonus_coins, response.balance.coins
            )

        def finish(conn: Connection, record: PurchaseRecord) -> None:
            if recorder is not None:
                recorder.record_in(conn, [result_for(record)])

        settled = self._clock.now()
        record = await self._purchases.settle_credit(terms, account_id, response.transaction_id, settled, finish)
        return self._count(result_for(record))

    def _credit_request(self, terms: CreditTerms, account_id: str, request_id: str) -> wpb.CreditPurchaseRequest:
        purchase = terms.purchase
        return wpb.CreditPurchaseRequest(
            request_id=wallet_request_id("credit", request_id, purchase.store.value, purchase.store_transaction_id),
            account_id=account_id,
            store=WALLET_STORE[purchase.store],
            store_transaction_id=purchase.store_transaction_id,
            product_id=purchase.product_id,
            coins=terms.coins + terms.bonus_coins,
            bonus_coins=terms.bonus_coins,
            quantity=purchase.quantity,
            environment=WALLET_ENVIRONMENT[purchase.environment],
            storefront=purchase.storefront,
            price=money_pb2.Money(amount_minor=purchase.price.amount_minor, currency_code=purchase.price.currency)
            if purchase.price
            else None,
            purchase_time=_timestamp(purchase.purchase_time),
            flagged_for_review=terms.flagged_for_review,
        )

    async def record(self, purchase: VerifiedPurchase) -> PurchaseRecord:
        """Record a purchase no account has claimed yet (e.g. from a store
        notification); the first account to verify it later owns it."""
        now = self._clock.now()
        terms = credit_terms(self._catalog, purchase, now, RegionPolicy.ALLOW, "")
        return await self._purchases.claim(terms, None, now)

    async def _environment(
        self, store: StoreId, store_transaction_id: str, environment: Environment | None
    ) -> Environment:
        """The purchase key's environment: the caller's (a notification says it), else the recorded purchase's."""
        if environment is not None:
            return environment
        record = await self._purchases.get(store, store_transaction_id)
        return record.environment if record is not None else Environment.PRODUCTION

    async def apply_refund(self, refund: Refund, *, request_id: str) -> bool:
        """A store reports ``refund`` (a notification, reconciliation): :meth:`reverse` it,
        unless the purchase row already records this cumulative refund -- asked again with
        the same request id, the wallet would replay its first answer, "applied". True when
        this call moved coins; a purchase the wallet does not know moves nothing."""
        record = await self._purchases.get(refund.store, refund.store_transaction_id)
        if record is not None and already_refunded(record, refund):
            return False
        try:
            result = await self.reverse(refund, request_id=request_id)
        except NotFound:
            return False
        return result.applied

    async def reverse(self, refund: Refund, *, request_id: str) -> ReversalResult:
        """Claw back a refunded purchase. State-based: ``full``, or the cumulative refunded
        quantity, or the cumulative ``refunded_percentage_milli``; the same refund reported
        twice moves coins once. A partial refund that computes to nothing moves nothing
        (``nothing_refunded``): report it again when the store's figures change."""
        store, store_transaction_id, full = refund.store, refund.store_transaction_id, refund.full
        key = await self._environment(store, store_transaction_id, refund.environment)
        response = await self._wallet.reverse(
            wpb.ReversePurchaseRequest(
                request_id=wallet_request_id(
                    "reverse",
                    request_id,
                    store.value,
                    store_transaction_id,
                    "full" if full else str(refund.refunded_quantity),
                    str(refund.refunded_percentage_milli),
                ),
                store=WALLET_STORE[store],
                environment=WALLET_ENVIRONMENT[key],
                store_transaction_id=store_transaction_id,
                full_refund=full,
                refunded_quantity=0 if full else refund.refunded_quantity,
                refunded_percentage_milli=0 if full else refund.refunded_percentage_milli,
                reason=refund.reason[:256],
            )
        )
        if response.state == wpb.REVERSAL_STATE_NOTHING_REFUNDED:
            return ReversalResult(False, 0, response.account_id, response.balance.coins, None, nothing_refunded=True)
        record = await self._purchases.mark_refund(
            store,
            store_transaction_id,
            0 if full else refund.refunded_quantity,
            0 if full else refund.refunded_percentage_milli,
            self._clock.now(),
        )
        return ReversalResult(
            response.state == wpb.REVERSAL_STATE_APPLIED,
            response.coins_reversed,
            response.account_id,
            response.balance.coins,
            record,
        )

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
        response = await self._wallet.restore(
            wpb.RestorePurchaseRequest(
                request_id=wallet_request_id("restore", request_id, store.value, store_transaction_id),
                store=WALLET_STORE[store],
                environment=WALLET_ENVIRONMENT[key],
                store_transaction_id=store_transaction_id,
                reason=reason[:256],
            )
        )
        record = await self._purchases.mark_restored(store, store_transaction_id, self._clock.now())
        return ReversalResult(
            response.state == wpb.REVERSAL_STATE_APPLIED,
            response.coins_restored,
            response.account_id,
            response.balance.coins,
            record,
        )

    def _count(self, result: PurchaseResult) -> PurchaseResult:
        self._credits.labels(result.record.store.value, result.record.environment.value, result.outcome.value).inc()
        return result
