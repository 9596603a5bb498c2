"""What each stored notification does, applied through the receipts core's
exactly-once paths. Pure dispatch over ports: no SQL, no HTTP here.

Every effect is idempotent on its own (the purchase's store key for credits,
state-based reversal with cumulative quantities/percentages), so a row
processed again after a crash moves nothing the second time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from services.common.clock import Clock
from services.common.failpoints import Failpoints
from services.common.metrics import Metrics
from services.receipts.notifications.parse import APPLE, GOOGLE
from services.receipts.notifications.ports import (
    AccountDirectory,
    AppleServerApi,
    ConsumptionFacts,
    PlayApi,
    PurchaseActions,
    Refused,
)
from services.receipts.notifications.repository import DEAD, InboxStore, StoredNotification

log = logging.getLogger(__name__)

APP_STORE = "APP_STORE"
GOOGLE_PLAY = "GOOGLE_PLAY"

ONE_TIME_PRODUCT_PURCHASED = 1
ONE_TIME_PRODUCT_CANCELED = 2
REFUND_TYPE_QUANTITY_BASED_PARTIAL_REFUND = 2


@dataclass
class Handlers:
    actions: PurchaseActions
    accounts: AccountDirectory
    apple_api: AppleServerApi | None
    play: PlayApi | None
    package_name: str
    send_consumption: bool
    consumption: ConsumptionFacts | None = None


def _request_id(item: StoredNotification, what: str) -> str:
    return f"notification:{item.source}:{item.external_id}:{what}"[:128]


def refunded_quantity_from_play(purchase: Mapping[str, Any]) -> int:
    """Cumulative refunded packs = quantity - refundableQuantity over the line items."""
    bought = refundable = 0
    for item in purchase.get("productLineItem") or []:
        details = item.get("productOfferDetails") or {}
        quantity = int(details.get("quantity") or 1)
        bought += quantity
        refundable += int(details.get("refundableQuantity", quantity) or 0)
    return max(0, bought - refundable)


class NotificationHandler:
    def __init__(self, handlers: Handlers) -> None:
        self._h = handlers

    def handle(self, item: StoredNotification) -> str:
        if item.source == APPLE:
            return self._apple(item)
        if item.source == GOOGLE:
            return self._google(item)
        return "ignored"

    def _apple(self, item: StoredNotification) -> str:
        h = self._h
        kind = item.notification_type
        transaction: Mapping[str, Any] = item.payload.get("transaction") or {}
        txid = str(transaction.get("transactionId", ""))
        if kind == "TEST":
            return "test"
        if kind == "ONE_TIME_CHARGE":
            token = transaction.get("appAccountToken")
            account = h.accounts.account_for_app_account_token(str(token)) if token else None
            if account is None:
                h.actions.record_apple(transaction)
                return "recorded"
            applied = h.actions.credit_apple(account, transaction, _request_id(item, "credit"))
            return "credited" if applied.changed else (applied.detail or "already_credited")
        if kind == "REFUND":
            prorated = transaction.get("revocationType") == "REFUND_PRORATED"
            percentage = int(transaction.get("revocationPercentage") or 0) if prorated else 0
            applied = h.actions.reverse(
                store=APP_STORE,
                store_transaction_id=txid,
                environment=item.environment or "",
                full=not prorated,
                refunded_quantity=0,
                refunded_percentage_milli=percentage,
                reason=f"apple REFUND reason={transaction.get('revocationReason')}",
                request_id=_request_id(item, "reverse"),
            )
            return "reversed" if applied.changed else "already_reversed"
        if kind == "REFUND_REVERSED":
            applied = h.actions.restore(
                store=APP_STORE,
                store_transaction_id=txid,
                environment=item.environment or "",
                reason="apple REFUND_REVERSED",
                request_id=_request_id(item, "restore"),
            )
            return "restored" if applied.changed else "already_restored"
        if kind == "CONSUMPTION_REQUEST":
            if not (h.send_consumption and h.apple_api is not None and h.consumption is not None):
                return "recorded"
            status, percentage = h.consumption.consumption(txid)
            h.apple_api.send_consumption_information(
                txid,
                item.environment or "Production",
                {
                    "customerConsented": True,
                    "sampleContentProvided": False,
                    "deliveryStatus": status,
                    "consumptionPercentage": percentage if status == "DELIVERED" else 0,
                },
            )
            return "consumption_sent"
        if kind == "REFUND_DECLINED":
            return "recorded"
        log.info("apple notification type not used for coin packs", extra={"type": kind})
        return "ignored"

    def _google(self, item: StoredNotification) -> str:
        h = self._h
        notification: Mapping[str, Any] = item.payload.get("notification") or {}
        kind = item.notification_type
        if kind == "testNotification":
            return "test"
        if kind == "oneTimeProductNotification":
            sub = notification[kind]
            token, sku = str(sub["purchaseToken"]), str(sub.get("sku", ""))
            if sub.get("notificationType") == ONE_TIME_PRODUCT_CANCELED:
                return "canceled"
            if sub.get("notificationType") != ONE_TIME_PRODUCT_PURCHASED or h.play is None:
                return "ignored"
            purchase = h.play.get_product_purchase_v2(h.package_name, token)
            obfuscated = purchase.get("obfuscatedExternalAccountId")
            account = h.accounts.account_for_obfuscated_id(str(obfuscated)) if obfuscated else None
            applied = h.actions.credit_google(account, sku, token, _request_id(item, "credit"))
            if account is None:
                return "recorded"
            return "credited" if applied.changed else (applied.detail or "already_credited")
        if kind == "voidedPurchaseNotification":
            sub = notification[kind]
            token = str(sub["purchaseToken"])
            if int(sub.get("productType") or 2) != 2:
                return "ignored"
            refunded = 0
            partial = int(sub.get("refundType") or 1) == REFUND_TYPE_QUANTITY_BASED_PARTIAL_REFUND
            if partial and h.play is not None:
                refunded = refunded_quantity_from_play(h.play.get_product_purchase_v2(h.package_name, token))
            applied = h.actions.reverse(
                store=GOOGLE_PLAY,
                store_transaction_id=token,
                environment="",
                full=not partial,
                refunded_quantity=refunded,
                refunded_percentage_milli=0,
                reason=f"google voided orderId={sub.get('orderId', '')} refundType={sub.get('refundType')}",
                request_id=_request_id(item, f"reverse:{refunded}"),
            )
            return "reversed" if applied.changed else "already_reversed"
        log.info("google notification type not used for coin packs", extra={"type": kind})
        return "ignored"


class DeliveredFacts:
    """Coins are delivered the moment they are credited; how many of them were
    spent is the wallet's to say (no RPC tells it per purchase yet), so this
    reports DELIVERED with 0 % consumed."""

    def consumption(self, store_transaction_id: str) -> tuple[str, int]:
        return "DELIVERED", 0


class InboxProcessor:
    """Claims a stored row, applies it, and finishes or schedules a retry.

    A process that dies between the effect and the finish (failpoint
    ``receipts.notification.after_effect``) leaves the row leased; once the lease
    runs out the sweeper re-queues it and the effect's own idempotency makes
    the second run move nothing."""

    def __init__(
        self,
        inbox: InboxStore,
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
