"""The receipts service's client of the wallet's CreditPurchase, ReversePurchase
and RestorePurchase, with the wallet's errors mapped to receipts errors.

The wallet guarantees exactly once per (store, store_transaction_id). Its
failures map as: UNAVAILABLE, DEADLINE_EXCEEDED and anything unexpected →
UNAVAILABLE ``WALLET_UNAVAILABLE`` (retrying the verification is safe);
PERMISSION_DENIED, FAILED_PRECONDITION, NOT_FOUND and ABORTED keep their code
and the wallet's ErrorInfo reason (e.g. ``RECEIPT_BOUND_TO_OTHER_ACCOUNT``).
"""

from __future__ import annotations

import hashlib
import logging

import grpc

from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as wpb_grpc
from services.common.clients import error_info
from services.common.errors import DomainError
from services.receipts.errors import Aborted, FailedPrecondition, NotFound, PermissionDenied, Unavailable

log = logging.getLogger(__name__)

_PASS_THROUGH: dict[grpc.StatusCode, type[DomainError]] = {
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ABORTED: Aborted,
}


def wallet_request_id(kind: str, *parts: str) -> str:
    """A deterministic AIP-155 request id for a wallet call (at most 128 characters)."""
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:48]
    return f"receipts-{kind}-{digest}"


def map_wallet_error(error: grpc.aio.AioRpcError) -> DomainError:
    code = error.code()
    reason, metadata = error_info(error)
    mapped = _PASS_THROUGH.get(code)
    if mapped is not None:
        return mapped(reason or code.name, f"wallet: {error.details()}", metadata)
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        log.error("wallet answered %s (%s): %s", code.name, reason, error.details())
    return Unavailable("WALLET_UNAVAILABLE", "the wallet is unavailable; retry later", {"wallet_code": code.name})


class WalletClient:
    """Typed calls to the wallet over one gRPC channel."""

    def __init__(self, channel: grpc.aio.Channel, timeout_seconds: float = 10.0) -> None:
        self._channel = channel
        self._stub = wpb_grpc.WalletServiceStub(channel)
        self._timeout = timeout_seconds

    async def credit(self, request: wpb.CreditPurchaseRequest) -> wpb.CreditPurchaseResponse:
        try:
            response: wpb.CreditPurchaseResponse = await self._stub.CreditPurchase(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise map_wallet_error(error) from None
        return response

    async def reverse(self, request: wpb.ReversePurchaseRequest) -> wpb.ReversePurchaseResponse:
        try:
            response: wpb.ReversePurchaseResponse = await self._stub.ReversePurchase(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise map_wallet_error(error) from None
        return response

    async def restore(self, request: wpb.RestorePurchaseRequest) -> wpb.RestorePurchaseResponse:
        try:
            response: wpb.RestorePurchaseResponse = await self._stub.RestorePurchase(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise map_wallet_error(error) from None
        return response

    async def close(self) -> None:
        await self._channel.close(None)
