"""Domain errors of the receipts service, each with its gRPC code and stable reason."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from services.common.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.common.metrics import Metrics

__all__ = [
    "Aborted",
    "DomainError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ReceiptBoundToOtherAccount",
    "Refusals",
    "Unavailable",
]


class ReceiptBoundToOtherAccount(PermissionDenied):
    """The purchase was claimed by another account first (it stays theirs)."""

    def __init__(self, store_transaction_id: str) -> None:
        super().__init__(
            "RECEIPT_BOUND_TO_OTHER_ACCOUNT",
            "this purchase was already claimed by another account",
            {"store_transaction_id": store_transaction_id},
        )


class Refusals:
    """Counts the refusals (domain errors) of a verification path, by reason."""

    def __init__(self, metrics: Metrics, name: str, doc: str) -> None:
        self._counter = metrics.counter(name, doc, ("reason",))

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        try:
            yield
        except DomainError as error:
            self._counter.labels(error.reason).inc()
            raise
