"""The payouts domain's values: cash-outs, batches, provider submissions and their states."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from datetime import datetime

from services.common.actor import SYSTEM, Actor


class CashoutState(enum.Enum):
    RESERVING = "RESERVING"  # the row exists; its wallet hold is being made
    REQUESTED = "REQUESTED"
    BATCHED = "BATCHED"
    SUBMITTED = "SUBMITTED"
    PAID = "PAID"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"  # the hold would lapse before submission: never paid, diamonds released


# failure_reason values the creator sees.
HOLD_EXPIRED = "HOLD_EXPIRED"
CLAWED_BACK = "CLAWED_BACK"


class BatchState(enum.Enum):
    CREATED = "CREATED"
    SUBMITTED = "SUBMITTED"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"


class ChunkState(enum.Enum):
    """One provider submission (a PayPal payout batch) of part of our batch."""

    PENDING = "PENDING"
    SUBMITTED = "SUBMITTED"
    DONE = "DONE"
    # Ambiguous provider answers kept coming: its holds stay submitted until ops resolve it.
    PARKED = "PARKED"


class WalletAction(enum.Enum):
    """What the wallet still has to do with a cash-out's reservation (an outbox)."""

    COMMIT = "COMMIT"
    RELEASE = "RELEASE"


class DestinationChangeKind(enum.Enum):
    SET = "SET"
    VERIFY = "VERIFY"


@dataclass(frozen=True)
class Destination:
    creator_account_id: str
    provider: str
    receiver: str
    verified: bool
    changed_by: Actor = SYSTEM
    verified_by: Actor = SYSTEM
    updated_at: datetime | None = None


@dataclass(frozen=True)
class DestinationChange:
    kind: DestinationChangeKind
    provider: str
    receiver: str
    changed_by: Actor
    created_at: datetime


@dataclass(frozen=True)
class Cashout:
    cashout_id: str
    creator_account_id: str
    diamonds: int
    amount_minor: int
    currency: str
    rate: str
    provider: str
    receiver: str
    state: CashoutState
    batch_id: str
    chunk_id: str
    attempt: int
    reservation_id: str
    failure_reason: str
    provider_item_id: str
    provider_transaction_id: str
    provider_batch_id: str
    created_at: datetime
    updated_at: datetime
    requested_by: Actor = SYSTEM
    hold_expire_at: datetime | None = None

    @property
    def sender_item_id(self) -> str:
        return sender_item_id(self.cashout_id, self.attempt) if self.chunk_id else ""


@dataclass(frozen=True)
class StateTotal:
    state: CashoutState
    count: int
    diamonds: int
    amount_minor: int


@dataclass(frozen=True)
class Batch:
    batch_id: str
    state: BatchState
    currency: str
    cutoff_time: datetime
    item_count: int
    diamonds: int
    amount_minor: int
    totals: tuple[StateTotal, ...]
    created_at: datetime | None
    submitted_at: datetime | None
    completed_at: datetime | None
    provider_batch_id: str
    created_by: Actor = SYSTEM


@dataclass(frozen=True)
class PayoutLine:
    """One item of a provider submission."""

    cashout_id: str
    attempt: int
    receiver: str
    amount_minor: int
    currency: str
    reservation_id: str = ""
    diamonds: int = 0
    rate: str = ""

    @property
    def sender_item_id(self) -> str:
        return sender_item_id(self.cashout_id, self.attempt)


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    batch_id: str
    state: ChunkState
    provider_batch_id: str
    lines: tuple[PayoutLine, ...]


@dataclass(frozen=True)
class Settlement:
    """A cash-out whose reservation the wallet must still commit or release."""

    cashout_id: str
    reservation_id: str
    action: WalletAction
    reason: str
    diamonds: int = 0  # what the provider paid for (commits)


def derived_id(prefix: str, *parts: str) -> str:
    """A stable id from a request id, so a retried request lands on the same row and reservation."""
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]
    return f"{prefix}_{digest}"


def sender_item_id(cashout_id: str, attempt: int) -> str:
    return f"{cashout_id}-{attempt}"


def parse_sender_item_id(value: str) -> tuple[str, int] | None:
    cashout_id, sep, attempt = value.rpartition("-")
    if not sep or not attempt.isdigit():
        return None
    return cashout_id, int(attempt)


def reservation_id(cashout_id: str, attempt: int) -> str:
    """The wallet reservation of one attempt: the cash-out id itself first, then one per retry."""
    return cashout_id if attempt == 1 else f"{cashout_id}.{attempt}"
