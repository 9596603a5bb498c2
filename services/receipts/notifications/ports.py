"""What notification handling needs from the rest of the receipts service and
from the stores. The receipts core, the App Store Server API client and the
Play client implement these; tests and `shims` provide stand-ins."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


class VerificationFailed(Exception):
    """A JWS is forged, malformed, or not chained to a trusted root."""


class AppleJwsVerifier(Protocol):
    def verify(self, jws: str) -> Mapping[str, Any]:
        """Check the x5c chain up to a trusted root and the ES256 signature; return the payload.

        Raises VerificationFailed."""
        ...


class StoreUnavailable(Exception):
    """A store API or the wallet failed in a retryable way (5xx, 429, timeout)."""


class Refused(Exception):
    """The core refused the effect for good (unknown product, another account's
    purchase …); retrying cannot change it, so the notification is finished."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Applied:
    """What the exactly-once path did: ``changed`` is False when it had been done before."""

    changed: bool
    detail: str = ""


class PurchaseActions(Protocol):
    """The receipts core's exactly-once purchase paths (the same ones the gRPC
    RPCs use). Every method is idempotent: repeating it moves nothing."""

    def credit_apple(self, account_id: str, transaction: Mapping[str, Any], request_id: str) -> Applied:
        """Credit a verified Apple transaction payload (as VerifyApplePurchase does)."""
        ...

    def record_apple(self, transaction: Mapping[str, Any]) -> None:
        """Record a verified Apple transaction no account of ours claimed yet
        (the first account to verify it later owns it)."""
        ...

    def credit_google(self, account_id: str | None, product_id: str, purchase_token: str, request_id: str) -> Applied:
        """Query Google and credit the purchase (as VerifyGooglePurchase does); with
        ``account_id`` None only record it for the account that claims it later."""
        ...

    def reverse(
        self,
        *,
        store: str,
        store_transaction_id: str,
        environment: str,
        full: bool,
        refunded_quantity: int,
        refunded_percentage_milli: int,
        reason: str,
        request_id: str,
    ) -> Applied:
        """State-based claw-back: the whole purchase (``full``), or the cumulative refunded
        quantity or percentage. ``environment`` as the store spells it ('' = as recorded)."""
        ...

    def restore(
        self, *, store: str, store_transaction_id: str, environment: str, reason: str, request_id: str
    ) -> Applied: ...


class AccountDirectory(Protocol):
    def account_for_app_account_token(self, token: str) -> str | None: ...

    def account_for_obfuscated_id(self, obfuscated_id: str) -> str | None: ...


class AppleServerApi(Protocol):
    def send_consumption_information(self, transaction_id: str, environment: str, body: Mapping[str, Any]) -> None:
        """PUT /inApps/v2/transactions/consumption/{transactionId}."""
        ...

    def get_refund_history(self, transaction_id: str, environment: str, revision: str | None) -> Mapping[str, Any]:
        """GET /inApps/v2/refund/lookup/{transactionId}: {signedTransactions, revision, hasMore}."""
        ...


class PlayApi(Protocol):
    def get_product_purchase_v2(self, package_name: str, purchase_token: str) -> Mapping[str, Any]:
        """purchases.productsv2.getproductpurchasev2."""
        ...

    def list_voided_purchases(
        self, package_name: str, start_time_ms: int, end_time_ms: int, page_token: str | None
    ) -> Mapping[str, Any]:
        """purchases.voidedpurchases.list (type=0, includeQuantityBasedPartialRefund=true)."""
        ...


class ConsumptionFacts(Protocol):
    def consumption(self, store_transaction_id: str) -> tuple[str, int]:
        """(deliveryStatus, consumptionPercentage in milliunits) for Send Consumption Information."""
        ...


class RecentPurchases(Protocol):
    def recent_apple_transactions(self, since_ms: int) -> list[tuple[str, str]]:
        """(transactionId, environment) of App Store purchases made since ``since_ms``."""
        ...
