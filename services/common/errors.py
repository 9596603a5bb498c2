"""Domain errors: each carries a gRPC status code and a stable UPPER_SNAKE reason.

Domain code raises these; the one server interceptor turns them into a
``google.rpc.Status`` with an ``ErrorInfo`` (domain ``coinstore``). Anything
else that escapes a handler becomes INTERNAL with a generic message.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

ERROR_DOMAIN = "coinstore"


class DomainError(Exception):
    """Base class. Subclasses fix ``code``; each raise names its ``reason``."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, reason: str, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(DomainError):
    """Malformed regardless of state; always names the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str, reason: str = "INVALID_ARGUMENT") -> None:
        super().__init__(reason, f"{field}: {message}", {"field": field})
        self.field = field
        self.description = message


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(DomainError):
    code = grpc.StatusCode.ABORTED


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RequestIdReused(FailedPrecondition):
    """AIP-155: the same request_id came back with a different body."""

    def __init__(self, request_id: str) -> None:
        super().__init__(
            "REQUEST_ID_REUSED",
            "request_id was already used for a different request",
            {"request_id": request_id},
        )
