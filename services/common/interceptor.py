"""The one server interceptor: request id, authentication, authorization,
metrics, and the mapping of domain errors to ``google.rpc.Status`` + ``ErrorInfo``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from sqlalchemy.exc import InterfaceError, OperationalError

from services.common.auth import TokenVerifier, authorize, caller_var
from services.common.errors import ERROR_DOMAIN, DomainError, InvalidArgument, Unavailable
from services.common.limits import check_request
from services.common.logs import request_id_var
from services.common.metrics import Metrics

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
_MAX_REQUEST_ID = 128


def status_for(error: DomainError) -> status_pb2.Status:
    """The rich status for a domain error: ErrorInfo always, BadRequest for a bad field."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    details = [_pack(info)]
    if isinstance(error, InvalidArgument):
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.description)
            ]
        )
        details.append(_pack(bad))
    return status_pb2.Status(code=error.code.value[0], message=error.message, details=details)


def internal_status() -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN)
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error", details=[_pack(info)])


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every unary-unary coinstore RPC. Health and reflection pass untouched.

    Each method's wrapped handler is built on its first call and reused: the
    continuation resolves the same handler for a method every time.
    """

    def __init__(self, verifier: TokenVerifier, scopes: Mapping[str, str], metrics: Metrics) -> None:
        self._verifier = verifier
        self._scopes = dict(scopes)
        self._metrics = metrics
        self._handlers: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        scope = self._scopes.get(method)
        if handler is None or scope is None or handler.unary_unary is None:
            return handler
        # The request arrives as bytes and is decoded in the guard, after authentication:
        # grpc.aio would answer garbage with UNKNOWN and a logged traceback.
        wrapped = self._handlers[method] = grpc.unary_unary_rpc_method_handler(
            self._guard(method, scope, handler.unary_unary, handler.request_deserializer),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
        return wrapped

    def _guard(
        self,
        method: str,
        scope: str,
        inner: Callable[[Any, Any], Any],
        decode: Callable[[bytes], Any] | None,
    ) -> Callable[[Any, Any], Any]:
        metrics = self._metrics
        verifier = self._verifier
        short = method.rsplit("/", 1)[-1]
        latency = metrics.rpc_latency.labels(metrics.service, short)
        answered = metrics.rpc_requests.labels(metrics.service, short, "OK")

        async def guarded(request: Any, context: Any) -> Any:
            request_id = authorization = None
            for key, value in context.invocation_metadata() or ():
                if key == REQUEST_ID_HEADER and isinstance(value, str):
                    request_id = value[:_MAX_REQUEST_ID]
                elif key == "authorization" and isinstance(value, str):
                    authorization = value
            request_id = request_id or secrets.token_hex(16)
            token = request_id_var.set(request_id)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            started = time.perf_counter()
            code = "OK"
            try:
                try:
                    caller = verifier.verify(authorization)
                    authorize(caller, scope)
                    caller_token = caller_var.set(caller)
                    try:
                        result = inner(_decoded(request, decode, short), context)
                        if asyncio.iscoroutine(result):
                            result = await result
                    finally:
                        caller_var.reset(caller_token)
                    return result
                except DomainError as error:
                    code = error.code.name
                    metrics.rpc_errors.labels(metrics.service, short, error.reason).inc()
                    if error.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
                        log.warning("%s failed: %s (%s)", short, error.reason, error.message)
                    await _abort(context, status_for(error), request_id)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    code = "ABORTED_BY_HANDLER"
                    raise
                except (OperationalError, InterfaceError) as error:
                    # The database went away (connection refused, reset, terminated, timed
                    # out); nothing was committed that a retry would repeat (AIP-155).
                    code = "UNAVAILABLE"
                    unavailable = Unavailable("DATABASE_UNAVAILABLE", "the database is unavailable; retry later")
                    metrics.rpc_errors.labels(metrics.service, short, unavailable.reason).inc()
                    log.warning("%s: database unavailable (%s)", short, type(error.orig).__name__)
                    await _abort(context, status_for(unavailable), request_id)
                except Exception:
                    code = "INTERNAL"
                    metrics.rpc_errors.labels(metrics.service, short, "INTERNAL").inc()
                    log.exception("unexpected error in %s", method)
                    await _abort(context, internal_status(), request_id)
            finally:
                (answered if code == "OK" else metrics.rpc_requests.labels(metrics.service, short, code)).inc()
                latency.observe(time.perf_counter() - started)
                request_id_var.reset(token)

        return guarded


def _decoded(raw: Any, decode: Callable[[bytes], Any] | None, method: str) -> Any:
    if decode is None or not isinstance(raw, bytes):
        return raw
    try:
        message = decode(raw)
    except Exception:  # protobuf raises DecodeError, and others for some malformed input
        raise InvalidArgument(
            "request", f"the request body is not a valid {method} request message", reason="MALFORMED_REQUEST"
        ) from None
    check_request(message)
    return message


async def _abort(context: Any, status: status_pb2.Status, request_id: str) -> None:
    await context.abort(
        _STATUS_CODES[status.code],
        status.message,
        trailing_metadata=(
            (STATUS_DETAILS_KEY, status.SerializeToString()),
            (REQUEST_ID_HEADER, request_id),
        ),
    )
