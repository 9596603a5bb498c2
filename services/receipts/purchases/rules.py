"""The pure rules of crediting a verified purchase: who may be credited Sandbox
purchases, the terms of the wallet credit (coins, promotion bonus at purchase
time, quantity) and the region policy. No gRPC, no SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.common.catalog import Catalog
from services.receipts.config import RegionPolicy
from services.receipts.errors import FailedPrecondition, InvalidArgument
from services.receipts.purchases.model import (
    CreditTerms,
    Environment,
    PurchaseRecord,
    Refund,
    StoredState,
    VerifiedPurchase,
)
from services.receipts.purchases.regions import to_alpha2


@dataclass(frozen=True)
class SandboxPolicy:
    """Who may be credited Sandbox purchases (Apple Sandbox: App Review and TestFlight buy
    there for free; Play test purchases). They are credited as Sandbox value, which can be
    spent and gifted but never cashed out."""

    everyone: bool
    accounts: frozenset[str] = frozenset()

    @classmethod
    def from_setting(cls, accounts: tuple[str, ...]) -> SandboxPolicy:
        return cls("*" in accounts, frozenset(a for a in accounts if a != "*"))

    def allows(self, account_id: str) -> bool:
        return self.everyone or account_id in self.accounts


def check_sandbox(policy: SandboxPolicy, purchase: VerifiedPurchase, account_id: str) -> None:
    """Raise SANDBOX_NOT_ALLOWED for a Sandbox purchase of an account not on the allow-list."""
    if purchase.environment is Environment.SANDBOX and not policy.allows(account_id):
        raise FailedPrecondition(
            "SANDBOX_NOT_ALLOWED",
            "Sandbox and test purchases are accepted only for the accounts COINSTORE_SANDBOX_ACCOUNTS lists",
            {"environment": "SANDBOX"},
        )


def check_quantity(quantity: int) -> int:
    if quantity < 1 or quantity > 10_000:
        raise FailedPrecondition("INVALID_QUANTITY", f"the store reported quantity {quantity}")
    return quantity


def credit_terms(
    catalog: Catalog, purchase: VerifiedPurchase, now: datetime, region_policy: RegionPolicy, account_region: str
) -> CreditTerms:
    """Coins (pack × quantity), the promotion bonus active at purchase time, and
    the region decision. Raises UNKNOWN_PRODUCT and REGION_MISMATCH."""
    pack = catalog.pack(purchase.store, purchase.product_id)
    if pack is None:
        raise FailedPrecondition(
            "UNKNOWN_PRODUCT",
            f"product {purchase.product_id!r} is not a coin pack of {purchase.store.value}",
            {"product_id": purchase.product_id},
        )
    quantity = check_quantity(purchase.quantity)
    promotion = catalog.promotion_for(purchase.store, purchase.product_id, purchase.purchase_time or now)
    bonus = promotion.bonus_coins * quantity if promotion is not None else 0
    flagged = region_decision(region_policy, purchase.storefront, account_region)
    return CreditTerms(purchase, pack.coins * quantity, bonus, flagged)


def normalize_account_region(account_region: str) -> str:
    """The caller's account country as alpha-2; '' when not given."""
    if not account_region:
        return ""
    alpha2 = to_alpha2(account_region) if len(account_region) == 2 else None
    if alpha2 is None:
        raise InvalidArgument("account_region", "must be an ISO 3166-1 alpha-2 country code such as US")
    return alpha2


def region_decision(policy: RegionPolicy, storefront: str, account_region: str) -> bool:
    """True when the purchase must be flagged for review; raises REGION_MISMATCH
    under the refuse policy. No account region or no storefront: nothing to compare."""
    if policy is RegionPolicy.ALLOW or not account_region or not storefront:
        return False
    store_country = to_alpha2(storefront)
    if store_country == account_region:
        return False
    if policy is RegionPolicy.REFUSE:
        raise FailedPrecondition(
            "REGION_MISMATCH",
            f"bought in storefront {storefront}, but the account's country is {account_region}",
            {"storefront": storefront, "account_region": account_region},
        )
    return True


def already_refunded(record: PurchaseRecord, refund: Refund) -> bool:
    """True when the purchase row already records exactly this cumulative refund."""
    refunded = (0, 0) if refund.full else (refund.refunded_quantity, refund.refunded_percentage_milli)
    recorded = (record.refunded_quantity, record.refunded_percentage_milli)
    return record.state is StoredState.REFUNDED and recorded == refunded
