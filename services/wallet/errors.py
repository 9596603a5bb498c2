"""Domain errors of the wallet service, each with its gRPC code and stable reason."""

from __future__ import annotations

from services.common.errors import (  # noqa: F401  (re-exported for the service's modules)
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
