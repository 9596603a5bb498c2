"""Channels to other coinstore services: bearer token, request-id propagation,
a default deadline on every call, and retries of UNAVAILABLE only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common.auth import TokenSource
from services.common.logs import request_id_var

DEFAULT_TIMEOUT_SECONDS = 10.0

_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
CHANNEL_OPTIONS = (
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 30_000),
)


def _call_metadata(tokens: TokenSource, metadata: Any) -> list[tuple[str, str]]:
    merged = [(k, v) for k, v in (metadata or ()) if k not in ("authorization",)]
    merged.append(("authorization", tokens.header()))
    request_id = request_id_var.get()
    if request_id and not any(k == "x-request-id" for k, _ in merged):
        merged.append(("x-request-id", request_id))
    return merged


class _AioAuth(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg,misc]
    def __init__(self, tokens: TokenSource, timeout: float) -> None:
        self._tokens = tokens
        self._timeout = timeout

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        new_details = grpc.aio.ClientCallDetails(
            details.method,
            details.timeout if details.timeout is not None else self._timeout,
            _call_metadata(self._tokens, details.metadata),  # type: ignore[arg-type]
            details.credentials,
            details.wait_for_ready,
        )
        return await continuation(new_details, request)


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: float | None, metadata: Any, credentials: Any) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = None
        self.compression = None


class _SyncAuth(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, tokens: TokenSource, timeout: float) -> None:
        self._tokens = tokens
        self._timeout = timeout

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        new_details = _SyncDetails(
            details.method,
            details.timeout if details.timeout is not None else self._timeout,
            _call_metadata(self._tokens, details.metadata),
            details.credentials,
        )
        return continuation(new_details, request)


def aio_channel(address: str, tokens: TokenSource, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=[_AioAuth(tokens, timeout)])  # type: ignore[list-item]


def sync_channel(address: str, tokens: TokenSource, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> grpc.Channel:
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.intercept_channel(channel, _SyncAuth(tokens, timeout))


def error_info(error: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata a coinstore service put in a failed call's
    status ("" and {} when there is none, or the details cannot be read)."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # details that do not match the status code and message
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return str(info.reason), dict(info.metadata)
    return "", {}
