"""What the payouts domain needs from the outside: the wallet, a payout provider, a task queue."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from services.payouts.domain.model import PayoutLine, Settlement


class WalletPort(Protocol):
    """The wallet's reservation contract. Refusals raise FailedPrecondition with the wallet's reason;
    an unreachable wallet raises Unavailable. Every call is idempotent (by ``request_id``, or by state)."""

    def reserve(
        self, request_id: str, account_id: str, diamonds: int, reservation_id: str, expire_time: datetime
    ) -> None: ...

    def submit(self, holds: Sequence[tuple[str, int]]) -> list[HoldAnswer]:
        """Mark (reservation id, diamonds) holds SUBMITTED in one call, just before a provider call."""
        ...

    def settle(self, items: Sequence[Settlement]) -> list[str | None]:
        """Commit (paid diamonds) or release each item's hold in one call, each under its own
        request id. Per item: "" when done (now or before), the wallet's refusal reason, or
        None when the wallet did not answer for it (retry later)."""
        ...


@dataclass(frozen=True)
class HoldAnswer:
    """The wallet's answer for one hold of a submission."""

    reservation_id: str
    refusal: str  # "" = submitted; RESERVATION_EXPIRED, RESERVATION_SHRUNK, …
    diamonds: int  # what the hold holds now


class ItemOutcome(enum.Enum):
    PAID = "PAID"
    FAILED = "FAILED"
    # Sent but not accepted by the receiver yet: must be cancelled before the diamonds go back.
    UNCLAIMED = "UNCLAIMED"
    PENDING = "PENDING"


@dataclass(frozen=True)
class ProviderItem:
    sender_item_id: str
    provider_item_id: str
    transaction_id: str
    outcome: ItemOutcome
    # The provider's own status text, kept verbatim (unknown values are PENDING).
    status: str
    reason: str


@dataclass(frozen=True)
class ProviderBatch:
    provider_batch_id: str
    status: str
    # The provider refused the whole submission: no item was paid.
    denied: bool
    items: tuple[ProviderItem, ...]


class ProviderError(Exception):
    pass


class ProviderUnavailable(ProviderError):
    """5xx, timeout or connection failure: retry the same call (same idempotency keys)."""


class ProviderAmbiguous(ProviderUnavailable):
    """An answer that proves nothing about what the provider created (e.g. "duplicate
    sender_batch_id" without a link to the original): retried, and counted toward parking."""


class ProviderRejected(ProviderError):
    """The provider refused the request itself (4xx); retrying it unchanged cannot help."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PayoutProvider(Protocol):
    """A payout rail. PayPal Payouts implements it; a Stripe Connect (transfers keyed by an
    Idempotency-Key) or Wise batch-group adapter (customerTransactionId) would too."""

    name: str
    max_items_per_submission: int

    def submit(self, sender_batch_id: str, lines: Sequence[PayoutLine]) -> str:
        """Pay ``lines`` once under ``sender_batch_id``; returns the provider's batch id. Submitting an id
        the provider already has returns that original batch instead of paying again."""
        ...

    def batch(self, provider_batch_id: str) -> ProviderBatch: ...

    def cancel_unclaimed(self, provider_item_id: str) -> bool:
        """Cancel an unclaimed item (the money returns to us); False if it can no longer be cancelled."""
        ...


class TaskQueue(Protocol):
    def enqueue(self, task: str, *args: str, countdown: float | None = None) -> None: ...
