"""VerifyGooglePurchase: ask Google about the token, apply the Play rules, credit
through the one crediting path, then have the purchase consumed.

Consumption happens strictly after the credit committed: the "credited, not
yet consumed" row is written in the very transaction that marks the purchase
CREDITED (through the crediting path's recorder hook), and only then is the
Celery consume task queued (:mod:`services.receipts.google.tasks`). If queueing
fails or the worker dies, the periodic sweep finds the row (or a credited
purchase without a row) and consumes it.

:meth:`GooglePurchases.credit_token` is the "query Google and credit" path the
notification inbox reuses for RTDN ONE_TIME_PRODUCT_PURCHASED.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from services.common.catalog import Catalog
from services.common.clock import Clock
from services.common.errors import DomainError
from services.receipts.errors import FailedPrecondition, InvalidArgument, NotFound, Refusals
from services.receipts.google.client import PlayApiError, PlayClient
from services.receipts.google.repository import ConsumptionRepository
from services.receipts.google.rules import (
    GooglePolicy,
    GoogleVerdict,
    PurchaseV2,
    check_account,
    check_package,
    evaluate,
)
from services.receipts.purchases.binding import Binding
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.model import (
    Claim,
    Outcome,
    PurchaseRecord,
    PurchaseResult,
    StoredState,
    VerifiedPurchase,
)
from services.receipts.purchases.repository import CreditHook, PurchaseRepository

log = logging.getLogger(__name__)

MAX_PURCHASE_TOKEN = 512
# The characters the wallet accepts in a store transaction id (real tokens use base64url and dots).
_TOKEN_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+/=@")


def require_purchase_token(token: str) -> str:
    """A Play purchase token: non-empty, bounded, printable URL-safe characters."""
    if not token or len(token) > MAX_PURCHASE_TOKEN or not set(token) <= _TOKEN_CHARACTERS:
        raise InvalidArgument(
            "purchase_token",
            f"must be a Play purchase token (1-{MAX_PURCHASE_TOKEN} URL-safe characters)",
            "INVALID_PURCHASE_TOKEN",
        )
    return token


def map_lookup_error(error: PlayApiError) -> DomainError:
    """A Google error answering a purchase look-up, as the caller should see it."""
    if error.status == 400:
        return InvalidArgument(
            "purchase_token", f"Google rejected the token: {error.message}", "INVALID_PURCHASE_TOKEN"
        )
    if error.status == 404:
        return NotFound("PURCHASE_NOT_FOUND", "Google does not know this purchase token", {"store": "google"})
    if error.status == 410:
        return FailedPrecondition("PURCHASE_TOKEN_EXPIRED", "the purchase token is no longer valid at Google")
    log.warning("unexpected Google Play answer %d %s: %s", error.status, error.reason, error.message)
    return FailedPrecondition(
        "STORE_REJECTED", f"Google Play answered {error.status} {error.reason}", {"status": str(error.status)}
    )


@dataclass(eq=False)
class GooglePurchases:
    """VerifyGooglePurchase and :meth:`credit_token`; ``client`` is the Android
    Publisher client, ``enqueue_consume`` hands a credited token to the worker."""

    client: PlayClient
    crediting: Crediting
    catalog: Catalog
    binding: Binding
    purchases: PurchaseRepository
    consumptions: ConsumptionRepository
    policy: GooglePolicy
    enqueue_consume: Callable[[str], None]
    clock: Clock
    # coinstore_receipts_google_refusals
    refusals: Refusals

    async def verify(
        self, claim: Claim, product_id: str, purchase_token: str, package_name: str, recorder: CreditHook | None
    ) -> PurchaseResult:
        """VerifyGooglePurchase (``package_name`` '' means the configured one)."""
        with self.refusals.counted():
            return await self.credit_token(purchase_token, product_id, claim, package_name, recorder)

    async def credit_token(
        self,
        purchase_token: str,
        product_id: str,
        claim: Claim | None,
        package_name: str = "",
        recorder: CreditHook | None = None,
        purchase: PurchaseV2 | None = None,
    ) -> PurchaseResult:
        """Query Google for ``purchase_token`` (unless the caller just did: ``purchase``)
        and credit it to the claiming account.

        With no claim (a notification nobody claimed yet) the purchase is only
        recorded (outcome RECORDED, or the stored state's answer); the first account
        to verify it owns it (or the account its obfuscatedAccountId names, when set).
        """
        package = check_package(self.policy, package_name)
        if purchase is None:
            try:
                purchase = await self.client.aget_purchase_v2(package, purchase_token)
            except PlayApiError as error:
                raise map_lookup_error(error) from None
        verdict = evaluate(purchase, purchase_token, product_id, self.policy, self.catalog)
        if claim is not None:
            check_account(purchase, self.binding, claim.account_id)
        if verdict.cancelled or verdict.consumed:
            return await self._settled(verdict, claim, recorder)
        if claim is None:
            return _recorded(await self.crediting.record(verdict.purchase))
        # The "credited, not yet consumed" row commits in the same transaction as the CREDITED state.
        note = self.consumptions.after_credit(
            recorder, purchase_token, package, verdict.line_item.product_id, self.clock.now()
        )
        result = await self.crediting.credit(verdict.purchase, claim, note)
        if note.added:
            self._queue_consume(purchase_token)
        return result

    async def _settled(
        self, verdict: GoogleVerdict, claim: Claim | None, recorder: CreditHook | None
    ) -> PurchaseResult:
        """Cancelled or already consumed at Google: only a purchase we credited before is answered."""
        token = verdict.purchase.store_transaction_id
        record = await self.purchases.get(verdict.purchase.store, token)
        credited = record is not None and record.state in (StoredState.CREDITED, StoredState.REFUNDED)
        if credited and claim is not None:
            return await self.crediting.credit(verdict.purchase, claim, recorder)
        if credited and record is not None:
            return _recorded(record)
        if verdict.cancelled and await self.crediting.refunds.get(verdict.purchase.store, token) is not None:
            # Refunded (voided) before it was ever credited: recorded, and shown, as revoked.
            if claim is not None:
                return await self.crediting.credit(_revoked(verdict), claim, recorder)
            return _recorded(await self.crediting.record(_revoked(verdict)))
        if verdict.cancelled:
            if record is not None and record.state is StoredState.PENDING:
                await self.crediting.record(_revoked(verdict))
            raise FailedPrecondition("PURCHASE_CANCELLED", "Google reports the purchase as cancelled")
        raise FailedPrecondition(
            "PURCHASE_ALREADY_CONSUMED", "the purchase was consumed at Google but never credited here"
        )

    def _queue_consume(self, token: str) -> None:
        """Queue the consume without waiting for the broker; the sweep covers a lost message."""
        try:
            self.enqueue_consume(token)
        except Exception as exc:
            log.warning("could not queue the consume of a Play purchase (the sweep will retry): %s", exc)

    async def aclose(self) -> None:
        """Send the queued consumes, then close the client (both sides; on its event loop)."""
        close_enqueuer = getattr(self.enqueue_consume, "close", None)
        if close_enqueuer is not None:
            close_enqueuer()
        await self.client.aclose()


def _revoked(verdict: GoogleVerdict) -> VerifiedPurchase:
    return verdict.purchase.as_revoked()


def _recorded(record: PurchaseRecord) -> PurchaseResult:
    outcome = {
        StoredState.CREDITED: Outcome.ALREADY_CREDITED,
        StoredState.REFUNDED: Outcome.REFUNDED,
        StoredState.PENDING: Outcome.PENDING,
        StoredState.REVOKED: Outcome.REVOKED,
    }.get(record.state, Outcome.RECORDED)
    return PurchaseResult(outcome, record, 0, 0, 0)
