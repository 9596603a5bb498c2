"""Google Play purchase rules: a ``ProductPurchaseV2`` → a :class:`VerifiedPurchase`,
or a refusal with its own reason. No I/O.

Credited only when Google says PURCHASED, the line item is the claimed
product, the purchase is not consumed yet (unless we credited it before: the
caller decides that), the ``obfuscatedExternalAccountId`` (when set) is the
account's binding, and test purchases are allowed by policy. PENDING is
recorded with nothing credited.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from services.common.catalog import Catalog, Price, StoreId
from services.receipts.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.receipts.purchases.model import Environment, VerifiedPurchase, evidence_hash

if TYPE_CHECKING:
    from services.receipts.purchases.binding import Binding

# Purchase states of ProductPurchaseV2.purchaseStateContext (note Google's double L).
PURCHASED = "PURCHASED"
PENDING = "PENDING"
CANCELLED = "CANCELLED"
CONSUMED = "CONSUMPTION_STATE_CONSUMED"


@dataclass(frozen=True)
class LineItem:
    product_id: str
    quantity: int
    refundable_quantity: int
    consumption_state: str

    @property
    def consumed(self) -> bool:
        return self.consumption_state == CONSUMED


@dataclass(frozen=True)
class PurchaseV2:
    """ProductPurchaseV2, unknown enum values kept as raw strings."""

    purchase_state: str
    acknowledgement_state: str
    line_items: tuple[LineItem, ...]
    order_id: str
    obfuscated_account_id: str
    region_code: str
    test: bool
    completion_time: datetime | None
    raw: dict[str, Any]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> PurchaseV2:
        items = []
        for item in body.get("productLineItem") or []:
            offer = item.get("productOfferDetails") or {}
            quantity = int(offer.get("quantity") or 1)
            refundable = offer.get("refundableQuantity")
            items.append(
                LineItem(
                    product_id=str(item.get("productId", "")),
                    quantity=quantity,
                    refundable_quantity=quantity if refundable is None else int(refundable),
                    consumption_state=str(offer.get("consumptionState", "CONSUMPTION_STATE_UNSPECIFIED")),
                )
            )
        completion = body.get("purchaseCompletionTime")
        completion_time = None
        if completion:
            try:
                completion_time = datetime.fromisoformat(str(completion).replace("Z", "+00:00"))
            except ValueError:
                completion_time = None
        return cls(
            purchase_state=str((body.get("purchaseStateContext") or {}).get("purchaseState", "")),
            acknowledgement_state=str(body.get("acknowledgementState", "")),
            line_items=tuple(items),
            order_id=str(body.get("orderId") or ""),
            obfuscated_account_id=str(body.get("obfuscatedExternalAccountId") or ""),
            region_code=str(body.get("regionCode") or ""),
            test="testPurchaseContext" in body,
            completion_time=completion_time,
            raw=body,
        )


@dataclass(frozen=True)
class VoidedPurchase:
    purchase_token: str
    order_id: str
    purchase_time_ms: int
    voided_time_ms: int
    voided_source: int
    voided_reason: int
    # Set only for a quantity-based partial refund; None means everything still refundable was refunded.
    voided_quantity: int | None

    @classmethod
    def parse(cls, body: dict[str, Any]) -> VoidedPurchase:
        quantity = body.get("voidedQuantity")
        return cls(
            purchase_token=str(body.get("purchaseToken", "")),
            order_id=str(body.get("orderId") or ""),
            purchase_time_ms=int(body.get("purchaseTimeMillis") or 0),
            voided_time_ms=int(body.get("voidedTimeMillis") or 0),
            voided_source=int(body.get("voidedSource") or 0),
            voided_reason=int(body.get("voidedReason") or 0),
            voided_quantity=None if quantity is None else int(quantity),
        )


@dataclass(frozen=True)
class VoidedQuery:
    """Which voided purchases purchases.voidedpurchases.list returns: voided in the
    window (Google keeps 30 days), with quantity-based partial refunds or not."""

    start_time_ms: int | None = None
    end_time_ms: int | None = None
    max_results: int = 1000
    include_partial_refunds: bool = True
    include_subscriptions: bool = False


@dataclass(frozen=True)
class VoidedPage:
    purchases: tuple[VoidedPurchase, ...]
    next_page_token: str


# RTDN oneTimeProductNotification.notificationType and voidedPurchaseNotification fields.
ONE_TIME_PRODUCT_PURCHASED = 1
ONE_TIME_PRODUCT_CANCELED = 2
PRODUCT_TYPE_ONE_TIME = 2
REFUND_TYPE_FULL = 1
REFUND_TYPE_QUANTITY_BASED_PARTIAL = 2


@dataclass(frozen=True)
class ProductNotification:
    """RTDN ``oneTimeProductNotification`` (the webhook checked its fields)."""

    notification_type: int
    purchase_token: str
    sku: str

    @classmethod
    def parse(cls, body: dict[str, Any]) -> ProductNotification:
        return cls(int(body["notificationType"]), str(body["purchaseToken"]), str(body.get("sku", "")))


@dataclass(frozen=True)
class VoidedNotification:
    """RTDN ``voidedPurchaseNotification``; ``refund_type`` as Google sent it (None: absent)."""

    purchase_token: str
    order_id: str
    product_type: int
    refund_type: int | None

    @property
    def partial(self) -> bool:
        """A quantity-based partial refund (refundableQuantity says how many packs are left)."""
        return (self.refund_type or REFUND_TYPE_FULL) == REFUND_TYPE_QUANTITY_BASED_PARTIAL

    @classmethod
    def parse(cls, body: dict[str, Any]) -> VoidedNotification:
        refund_type = body.get("refundType")
        return cls(
            str(body["purchaseToken"]),
            str(body.get("orderId", "")),
            int(body.get("productType") or PRODUCT_TYPE_ONE_TIME),
            None if refund_type is None else int(refund_type),
        )


@dataclass(frozen=True)
class GooglePolicy:
    package_name: str


@dataclass(frozen=True)
class GoogleVerdict:
    """What the rules decided for one purchase token."""

    purchase: VerifiedPurchase
    line_item: LineItem
    # Google already consumed it: credit only if we credited it before.
    consumed: bool
    cancelled: bool


def check_package(policy: GooglePolicy, package_name: str) -> str:
    """The package to query: the request's (if given) must be the configured one."""
    if package_name and package_name != policy.package_name:
        raise InvalidArgument(
            "package_name", f"this service verifies purchases of {policy.package_name} only", "PACKAGE_MISMATCH"
        )
    return policy.package_name


def line_item_for(purchase: PurchaseV2, product_id: str) -> LineItem:
    for item in purchase.line_items:
        if item.product_id == product_id:
            return item
    found = ", ".join(item.product_id for item in purchase.line_items) or "none"
    raise InvalidArgument(
        "product_id", f"the purchase token is for product(s) {found}, not {product_id}", "PRODUCT_MISMATCH"
    )


def check_account(purchase: PurchaseV2, binding: Binding, account_id: str) -> None:
    """A set obfuscatedExternalAccountId must be this account's; absent → the first claimer owns it."""
    given = purchase.obfuscated_account_id
    if given and not binding.obfuscated_account_id_matches(account_id, given):
        raise PermissionDenied(
            "ACCOUNT_MISMATCH", "the purchase was made for another account (obfuscatedAccountId)", {"store": "google"}
        )


def evaluate(
    purchase: PurchaseV2, token: str, product_id: str, policy: GooglePolicy, catalog: Catalog
) -> GoogleVerdict:
    """Apply the Play rules (account binding is checked separately, see :func:`check_account`)."""
    state = purchase.purchase_state
    if state not in (PURCHASED, PENDING, CANCELLED):
        raise FailedPrecondition(
            "PURCHASE_STATE_UNKNOWN", f"Google reports purchase state {state or '(none)'!r}", {"state": state}
        )
    item = line_item_for(purchase, product_id)
    pack = catalog.pack(StoreId.GOOGLE_PLAY, product_id)
    price = Price(pack.price.amount_minor * item.quantity, pack.price.currency) if pack is not None else None
    verified = VerifiedPurchase(
        store=StoreId.GOOGLE_PLAY,
        store_transaction_id=token,
        product_id=product_id,
        quantity=item.quantity,
        environment=Environment.SANDBOX if purchase.test else Environment.PRODUCTION,
        storefront=purchase.region_code.upper(),
        price=price,
        purchase_time=purchase.completion_time,
        order_id=purchase.order_id,
        pending=state == PENDING,
        evidence_sha256=evidence_hash(purchase.raw),
    )
    return GoogleVerdict(verified, item, consumed=item.consumed, cancelled=state == CANCELLED)


def refunded_quantity(purchase: PurchaseV2) -> int:
    """Packs refunded so far (cumulative): quantity - refundableQuantity over the line items."""
    bought = sum(item.quantity for item in purchase.line_items)
    refundable = sum(item.refundable_quantity for item in purchase.line_items)
    return max(0, bought - refundable)
