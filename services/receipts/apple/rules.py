"""App Store transaction rules: a verified ``JWSTransactionDecodedPayload`` →
a :class:`VerifiedPurchase`, or a refusal with its own reason. No I/O.

Apple's library checks only bundleId and environment after the signature;
coinstore also requires a consumable bought (not family-shared), a sane
quantity and the fields it credits by.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.common.catalog import CURRENCY_EXPONENTS, Price, StoreId
from services.receipts.errors import FailedPrecondition, InvalidArgument
from services.receipts.purchases.model import Environment, Refund, VerifiedPurchase

APPLE_ENVIRONMENTS = {"Production": Environment.PRODUCTION, "Sandbox": Environment.SANDBOX}
CONSUMABLE = "Consumable"


@dataclass(frozen=True)
class ApplePolicy:
    bundle_id: str
    # A transaction without appAccountToken is refused (require-token), not owned by its first claimer.
    require_token: bool = False

    def lookup_order(self, hint: Environment | None, sandbox_allowed: bool) -> list[Environment]:
        """Where to look a transaction id up: the device's hint if allowed, else
        Production, then the Sandbox when the account may buy there."""
        allowed = [Environment.PRODUCTION, *([Environment.SANDBOX] if sandbox_allowed else [])]
        if hint is not None and hint in allowed:
            return [hint]
        return allowed


def _millis(value: Any) -> datetime | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return datetime.fromtimestamp(value / 1000, UTC)
    return None


def apple_price(price: Any, currency: Any) -> Price | None:
    """Apple's price is in milliunits of the currency (990 = 0.99); minor units round down."""
    if not isinstance(price, int) or isinstance(price, bool) or price < 0 or not isinstance(currency, str):
        return None
    exponent = CURRENCY_EXPONENTS.get(currency)
    if exponent is None:
        return None
    return Price(price * 10**exponent // 1000, currency)


def check_transaction(payload: dict[str, Any], policy: ApplePolicy, field: str) -> VerifiedPurchase:
    """Apply the App Store rules to a payload whose signature is verified."""
    if payload.get("bundleId") != policy.bundle_id:
        raise InvalidArgument(
            field, f"the transaction is for bundle {payload.get('bundleId')!r}, not this app", "WRONG_BUNDLE"
        )
    environment = payload.get("environment")
    if environment not in APPLE_ENVIRONMENTS:
        # Xcode and LocalTesting transactions are signed by the device, never by Apple.
        raise FailedPrecondition(
            "WRONG_ENVIRONMENT",
            f"App Store environment {environment!r} is not accepted here",
            {"environment": str(environment)},
        )
    transaction_id = payload.get("transactionId")
    product_id = payload.get("productId")
    if not isinstance(transaction_id, str) or not transaction_id or len(transaction_id) > 128:
        raise InvalidArgument(field, "the transaction has no transactionId", "MALFORMED_TRANSACTION")
    if not isinstance(product_id, str) or not product_id:
        raise InvalidArgument(field, "the transaction has no productId", "MALFORMED_TRANSACTION")
    if payload.get("type") != CONSUMABLE:
        raise FailedPrecondition(
            "NOT_CONSUMABLE", f"{product_id} is a {payload.get('type')!r}, not a consumable coin pack"
        )
    ownership = payload.get("inAppOwnershipType", "PURCHASED")
    if ownership != "PURCHASED":
        raise FailedPrecondition("NOT_PURCHASED", f"the transaction's ownership is {ownership!r}, not PURCHASED")
    quantity = payload.get("quantity", 1)
    if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
        raise InvalidArgument(field, "the transaction's quantity is not a positive integer", "MALFORMED_TRANSACTION")
    storefront = payload.get("storefront")
    revoked = payload.get("revocationDate") is not None
    return VerifiedPurchase(
        store=StoreId.APP_STORE,
        store_transaction_id=transaction_id,
        product_id=product_id,
        quantity=quantity,
        environment=APPLE_ENVIRONMENTS[environment],
        storefront=storefront if isinstance(storefront, str) and len(storefront) <= 16 else "",
        price=apple_price(payload.get("price"), payload.get("currency")),
        purchase_time=_millis(payload.get("purchaseDate")),
        original_transaction_id=str(payload.get("originalTransactionId") or ""),
        revoked=revoked,
        refund=refund_of(payload, "apple revoked transaction") if revoked else None,
    )


def app_account_token(payload: dict[str, Any]) -> str:
    """The transaction's appAccountToken ('' when absent)."""
    token = payload.get("appAccountToken")
    return token if isinstance(token, str) else ""


def transaction_id(payload: dict[str, Any]) -> str:
    return str(payload.get("transactionId", ""))


def environment_of(payload: dict[str, Any]) -> Environment | None:
    """The environment the transaction names; None when it names none we accept."""
    return APPLE_ENVIRONMENTS.get(str(payload.get("environment") or ""))


def refund_of(payload: dict[str, Any], source: str) -> Refund:
    """The refund a revoked transaction reports (a REFUND notification, Get Refund History):
    prorated by ``revocationPercentage`` (milli-percent), else in full."""
    prorated = payload.get("revocationType") == "REFUND_PRORATED"
    return Refund(
        StoreId.APP_STORE,
        transaction_id(payload),
        environment_of(payload),
        full=not prorated,
        refunded_percentage_milli=int(payload.get("revocationPercentage") or 0) if prorated else 0,
        reason=f"{source} reason={payload.get('revocationReason')}",
    )
