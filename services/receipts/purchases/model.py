"""Purchases as the receipts service sees them, from a store's verified report
to the wallet's answer: the values every path (the RPCs, the notifications, the
worker, reconciliation) hands the one crediting path and gets back. No I/O.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from services.common.catalog import Price, StoreId


class Environment(enum.Enum):
    """Where the store says the purchase happened. Sandbox (Apple Sandbox, Play
    test purchases) is credited when the policy allows but kept out of revenue."""

    PRODUCTION = "production"
    SANDBOX = "sandbox"


class StoredState(enum.Enum):
    """State of a row in ``receipts_purchases``."""

    # Known and (possibly) bound, not credited yet.
    RECORDED = "recorded"
    CREDITED = "credited"
    # Revoked by the store before it was credited; never credited.
    REVOKED = "revoked"
    # Payment not complete (Play pending purchases).
    PENDING = "pending"
    # Credited, then refunded in whole or in part.
    REFUNDED = "refunded"
    # Bound, but the wallet refused the credit for good (``credit_refused_reason``);
    # the sweep leaves it, a new verification asks the wallet again.
    REFUSED = "refused"


class Outcome(enum.Enum):
    """What a verification call reports (PurchaseState in the proto)."""

    CREDITED = "credited"
    ALREADY_CREDITED = "already_credited"
    REVOKED = "revoked"
    PENDING = "pending"
    REFUNDED = "refunded"
    RECORDED = "recorded"


@dataclass(frozen=True)
class VerifiedPurchase:
    """A store transaction whose authenticity a store-specific path has proven.

    Store paths (App Store, Google Play, notifications) build this after their
    own checks (signature, bundle/package, product type, account token) and
    hand it to the one crediting path.
    """

    store: StoreId
    store_transaction_id: str
    product_id: str
    quantity: int
    environment: Environment
    # As the store reports it: App Store storefront (alpha-3) or Play region (alpha-2).
    storefront: str
    price: Price | None
    purchase_time: datetime | None
    order_id: str = ""
    original_transaction_id: str = ""
    revoked: bool = False
    pending: bool = False
    # SHA-256 of the store evidence the path verified; the wallet keeps it with the credit.
    evidence_sha256: str = ""
    # What the store's revocation says (refunded in full or by a share), when revoked.
    refund: Refund | None = None

    def as_revoked(self) -> VerifiedPurchase:
        """This purchase as refunded in full by the store (no longer pending)."""
        return replace(self, revoked=True, pending=False)


def evidence_hash(evidence: str | dict[str, Any]) -> str:
    """SHA-256 (hex) of store evidence: a signed JWS as received, or a store API resource
    as canonical JSON (sorted keys, no spaces), so the same answer always hashes alike."""
    text = evidence if isinstance(evidence, str) else json.dumps(evidence, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    """An account's claim to a purchase, made by one call: the caller's AIP-155
    request id (it only tells calls apart; the wallet's key is the store
    transaction) and the account's country as the caller gives it ('' unknown)."""

    account_id: str
    request_id: str
    account_region: str = ""


@dataclass(frozen=True)
class Refund:
    """A store's report that a purchase was refunded, cumulatively: all of it
    (``full``), or so many of its packs, or a share in milli-percent. The same
    report twice moves coins once (the wallet's reversal is state-based)."""

    store: StoreId
    store_transaction_id: str
    # The environment the store names; None: the one the purchase was recorded in.
    environment: Environment | None
    full: bool
    refunded_quantity: int = 0
    refunded_percentage_milli: int = 0
    reason: str = ""


@dataclass(frozen=True)
class CreditTerms:
    """What the wallet is asked to credit for one purchase; fixed at first claim."""

    purchase: VerifiedPurchase
    coins: int
    bonus_coins: int
    flagged_for_review: bool

    @property
    def total_coins(self) -> int:
        return self.coins + self.bonus_coins


@dataclass(frozen=True)
class PurchaseRecord:
    """A row of ``receipts_purchases``."""

    store: StoreId
    store_transaction_id: str
    account_id: str | None
    product_id: str
    quantity: int
    coins: int
    bonus_coins: int
    environment: Environment
    storefront: str
    price: Price | None
    purchase_time: datetime | None
    order_id: str
    original_transaction_id: str
    state: StoredState
    flagged_for_review: bool
    wallet_transaction_id: str
    refunded_quantity: int
    refunded_percentage_milli: int
    created_at: datetime
    updated_at: datetime
    # SHA-256 of the evidence verified when first recorded ('' none): the sweep sends it.
    evidence_sha256: str = ""
    # REFUSED: the wallet's ErrorInfo reason.
    credit_refused_reason: str = ""


@dataclass(frozen=True)
class PurchaseResult:
    """The answer for one store transaction."""

    outcome: Outcome
    record: PurchaseRecord
    coins_credited: int
    bonus_coins: int
    new_balance: int


@dataclass(frozen=True)
class ReversalResult:
    """What a refund (or its reversal) moved in the wallet, and the purchase row after it."""

    applied: bool
    coins_moved: int
    account_id: str
    new_balance: int
    record: PurchaseRecord | None
    nothing_refunded: bool = False
