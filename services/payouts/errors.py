"""Domain errors of the payouts service, each with its gRPC code and stable reason."""

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
