"""What each stored notification does, through the purchases core's own use
cases (the ones the RPCs use): a verified App Store transaction becomes a
VerifiedPurchase by the same App Store rules, a Play purchase is credited by
the same Google path, refunds become a Refund. No SQL, no HTTP here.

Every effect is idempotent on its own (the purchase's store key for credits,
state-based reversal with cumulative quantities/percentages), so a row
processed again after a crash moves nothing the second time.

The core is asyncio (the wallet's grpc.aio channel) and the worker is not:
each use case runs on the core's event loop (``loop``) while the worker's
thread waits.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from dataclasses import KW_ONLY, dataclass, replace
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from services.common.catalog import StoreId
from services.common.clock import Clock
from services.common.errors import DomainError, NotFound, Unavailable
from services.common.failpoints import Failpoints
from services.common.loop import OnLoop
from services.common.metrics import Metrics
from services.receipts.apple.client import AppStoreApi
from services.receipts.apple.rules import (
    ApplePolicy,
    app_account_token,
    check_transaction,
    environment_of,
    refund_of,
    transaction_id,
)
from services.receipts.google.rules import (
    ONE_TIME_PRODUCT_CANCELED,
    ONE_TIME_PRODUCT_PURCHASED,
    PRODUCT_TYPE_ONE_TIME,
    ProductNotification,
    VoidedNotification,
    refunded_quantity,
)
from services.receipts.google.verify import GooglePurchases
from services.receipts.notifications.parse import APPLE, GOOGLE
from services.receipts.notifications.repository import DEAD, InboxRepository, StoredNotification
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.model import Claim, Environment, Refund, VerifiedPurchase
from services.receipts.purchases.repository import BindingRepository

log = logging.getLogger(__name__)

T = TypeVar("T")


class Refused(Exception):
    """The core refused the effect for good (unknown product, another account's
    purchase …); retrying cannot change it, so the notification is finished."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConsumptionFacts(Protocol):
    def consumption(self, store_transaction_id: str) -> tuple[str, int]:
        """(deliveryStatus, consumptionPercentage in milliunits) for Send Consumption Information."""
        ...


class DeliveredFacts:
    """Coins are delivered the moment they are credited; how many of them were
    spent is the wallet's to say (no RPC tells it per purchase yet), so this
    reports DELIVERED with 0 % consumed."""

    def consumption(self, store_transaction_id: str) -> tuple[str, int]:
        return "DELIVERED", 0


def _request_id(item: StoredNotification, what: str) -> str:
    return f"notification:{item.source}:{item.external_id}:{what}"[:128]


@dataclass(eq=False)
class NotificationHandler:
    """Applies stored notifications; ``loop`` is the one the purchases core runs on."""

    crediting: Crediting
    google: GooglePurchases
    apple_policy: ApplePolicy
    apple_api: AppStoreApi
    bindings: BindingRepository
    loop: OnLoop
    _: KW_ONLY
    # Answer CONSUMPTION_REQUEST with Send Consumption Information (COINSTORE_APPLE_SEND_CONSUMPTION).
    send_consumption: bool
    consumption: ConsumptionFacts

    def handle(self, item: StoredNotification) -> str:
        """What the notification did (the row's outcome); raises :class:`Refused`."""
        if item.source == APPLE:
            return self._apple(item)
        if item.source == GOOGLE:
            return self._google_notification(item)
        return "ignored"

    def _core(self, use_case: Coroutine[Any, Any, T]) -> T:
        """Run a purchases use case; its refusals finish the notification, except
        UNAVAILABLE and NOT_FOUND (retried, unless the caller knows better)."""
        try:
            return self.loop.run(use_case)
        except (Unavailable, NotFound):
            raise
        except DomainError as error:
            raise Refused(error.reason) from error

    def _apple_purchase(self, transaction: dict[str, Any]) -> VerifiedPurchase:
        """The same App Store rules as VerifyApplePurchase (bundle, environment,
        consumable, ownership, quantity): a notification credits nothing the app's
        own report would not."""
        try:
            return check_transaction(transaction, self.apple_policy, "signedTransactionInfo")
        except DomainError as error:
            raise Refused(error.reason) from error

    def _refund(self, refund: Refund, request_id: str) -> str:
        moved = self._core(self.crediting.apply_refund(refund, request_id=request_id))
        return "reversed" if moved else "already_reversed"

    def _apple(self, item: StoredNotification) -> str:
        kind = item.notification_type
        transaction: dict[str, Any] = item.payload.get("transaction") or {}
        if kind == "TEST":
            return "test"
        if kind == "ONE_TIME_CHARGE":
            token = app_account_token(transaction)
            account = self.bindings.account_for_app_account_token(token) if token else None
            purchase = replace(
                self._apple_purchase(transaction), evidence_sha256=str(item.payload.get("evidence_sha256", ""))
            )
            if account is None:
                self._core(self.crediting.record(purchase))
                return "recorded"
            result = self._core(self.crediting.credit(purchase, Claim(account, _request_id(item, "credit"))))
            return result.outcome.value
        if kind == "REFUND":
            return self._refund(refund_of(transaction, "apple REFUND"), _request_id(item, "reverse"))
        if kind == "REFUND_REVERSED":
            return self._restore(transaction, _request_id(item, "restore"))
        if kind == "CONSUMPTION_REQUEST":
            return self._answer_consumption(transaction)
        if kind == "REFUND_DECLINED":
            return "recorded"
        log.info("apple notification type not used for coin packs", extra={"type": kind})
        return "ignored"

    def _restore(self, transaction: dict[str, Any], request_id: str) -> str:
        restore = self.crediting.restore(
            StoreId.APP_STORE,
            transaction_id(transaction),
            environment=environment_of(transaction),
            reason="apple REFUND_REVERSED",
            request_id=request_id,
        )
        try:
            result = self._core(restore)
        except NotFound:
            return "already_restored"
        return "restored" if result.applied else "already_restored"

    def _answer_consumption(self, transaction: dict[str, Any]) -> str:
        if not self.send_consumption:
            return "recorded"
        txid = transaction_id(transaction)
        status, percentage = self.consumption.consumption(txid)
        request = {
            "customerConsented": True,
            "sampleContentProvided": False,
            "deliveryStatus": status,
            "consumptionPercentage": percentage if status == "DELIVERED" else 0,
        }
        environment = environment_of(transaction) or Environment.PRODUCTION
        self.loop.run(self.apple_api.send_consumption_information(environment, txid, request))
        return "consumption_sent"

    def _google_notification(self, item: StoredNotification) -> str:
        notification: dict[str, Any] = item.payload.get("notification") or {}
        kind = item.notification_type
        if kind == "testNotification":
            return "test"
        if kind == "oneTimeProductNotification":
            return self._google_purchase(item, ProductNotification.parse(notification[kind]))
        if kind == "voidedPurchaseNotification":
            return self._google_voided(item, VoidedNotification.parse(notification[kind]))
        log.info("google notification type not used for coin packs", extra={"type": kind})
        return "ignored"

    def _google_purchase(self, item: StoredNotification, notification: ProductNotification) -> str:
        if notification.notification_type == ONE_TIME_PRODUCT_CANCELED:
            return "canceled"
        if notification.notification_type != ONE_TIME_PRODUCT_PURCHASED:
            return "ignored"
        token = notification.purchase_token
        purchase = self.google.client.get_purchase_v2(self.google.policy.package_name, token)
        obfuscated = purchase.obfuscated_account_id
        account = self.bindings.account_for_obfuscated_id(obfuscated) if obfuscated else None
        claim = None if account is None else Claim(account, _request_id(item, "credit"))
        credit = self.google.credit_token(token, notification.sku, claim)
        try:
            outcome = self._core(credit).outcome.value
        except NotFound as error:
            # Google does not know the token: nothing to credit, and retrying will not change that.
            outcome = error.reason.lower()
        # With no account of ours the purchase is only recorded, for the account that claims it.
        return "recorded" if account is None else outcome

    def _google_voided(self, item: StoredNotification, voided: VoidedNotification) -> str:
        if voided.product_type != PRODUCT_TYPE_ONE_TIME:
            return "ignored"
        token = voided.purchase_token
        refunded = 0
        if voided.partial:
            refunded = refunded_quantity(self.google.client.get_purchase_v2(self.google.policy.package_name, token))
        refund = Refund(
            StoreId.GOOGLE_PLAY,
            token,
            None,
            full=not voided.partial,
            refunded_quantity=refunded,
            reason=f"google voided orderId={voided.order_id} refundType={voided.refund_type}",
        )
        return self._refund(refund, _request_id(item, f"reverse:{refunded}"))


class InboxProcessor:
    """Claims a stored row, applies it, and finishes or schedules a retry.

    A process that dies between the effect and the finish (failpoint
    ``receipts.notification.after_effect``) leaves the row leased; once the lease
    runs out the sweeper re-queues it and the effect's own idempotency makes
    the second run move nothing."""

    def __init__(
        self,
        inbox: InboxRepository,
        handler: NotificationHandler,
        metrics: Metrics,
        clock: Clock,
        failpoints: Failpoints | None = None,
    ) -> None:
        self._inbox = inbox
        self._handler = handler
        self._clock = clock
        self._failpoints = failpoints or Failpoints()
        self.processed = metrics.counter(
            "coinstore_notifications_processed", "Notifications applied, by source and outcome", ("source", "outcome")
        )
        self.failures = metrics.counter(
            "coinstore_notification_failures",
            "Failed notification processing attempts (retried with backoff), by source and final",
            ("source", "dead"),
        )

    def process(self, notification_id: int) -> tuple[str, timedelta | None]:
        """Returns (what happened, delay before a retry or None)."""
        item = self._inbox.claim(notification_id, self._clock.now())
        if item is None:
            return "skipped", None
        try:
            outcome = self._handler.handle(item)
        except Refused as refused:
            outcome = f"refused:{refused.reason}"[:64]
        except Exception as exc:
            state, delay = self._inbox.fail(notification_id, f"{type(exc).__name__}: {exc}", self._clock.now())
            self.failures.labels(item.source, str(state == DEAD).lower()).inc()
            log.warning(
                "notification processing failed",
                extra={"notification_id": notification_id, "attempt": item.attempts, "state": state},
                exc_info=True,
            )
            return "failed", None if state == DEAD else delay
        self._failpoints.hit("receipts.notification.after_effect")
        if self._inbox.finish(notification_id, outcome, self._clock.now()):
            self.processed.labels(item.source, outcome).inc()
        return outcome, None
