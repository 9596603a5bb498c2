"""Domain errors of the wallet service, each with its gRPC code and stable reason.

Reasons the wallet raises: INVALID_ARGUMENT / SELF_GIFT (INVALID_ARGUMENT);
RECEIPT_BOUND_TO_OTHER_ACCOUNT (PERMISSION_DENIED); PURCHASE_NOT_FOUND,
GIFT_NOT_FOUND, RESERVATION_NOT_FOUND (NOT_FOUND); INSUFFICIENT_COINS,
ACCOUNT_RESTRICTED, SPENDING_LIMIT_EXCEEDED, INSUFFICIENT_DIAMONDS,
DIAMONDS_NOT_MATURE, RESERVATION_ID_REUSED, RESERVATION_ALREADY_COMMITTED,
RESERVATION_ALREADY_RELEASED, RESERVATION_EXPIRED, RESERVATION_SHRUNK (a submission
asks for more than a clawback left of the hold), REQUEST_ID_REUSED (FAILED_PRECONDITION).
Batch calls (SubmitReservations, SettleReservations) answer these per item.
"""

from __future__ import annotations

from services.common.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)

__all__ = [
    "Aborted",
    "DomainError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unavailable",
]
