"""The wallet port over gRPC (coinstore.wallet.v1 ReserveDiamonds / CommitReservation / ReleaseReservation)."""

from __future__ import annotations

from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2

from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as wpb_grpc
from services.common.auth import TokenSource
from services.common.clients import error_info, sync_channel
from services.payouts.errors import FailedPrecondition, NotFound, Unavailable

WALLET_TIMEOUT_SECONDS = 10.0
_DONE_ON_COMMIT = {"RESERVATION_ALREADY_COMMITTED"}
_DONE_ON_RELEASE = {"RESERVATION_ALREADY_RELEASED", "RESERVATION_EXPIRED"}


def _translate(error: grpc.RpcError) -> Exception:
    code = error.code()
    reason = error_info(error)[0]
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(reason or "WALLET_REFUSED", error.details() or "the wallet refused")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(reason or "NOT_FOUND", error.details() or "not found in the wallet")
    return Unavailable("WALLET_UNAVAILABLE", f"wallet call failed: {code.name} {error.details()}")


class GrpcWallet:
    def __init__(self, address: str, tokens: TokenSource) -> None:
        self._channel = sync_channel(address, tokens, WALLET_TIMEOUT_SECONDS)
        self._stub = wpb_grpc.WalletServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def reserve(
        self, request_id: str, account_id: str, diamonds: int, reservation_id: str, expire_time: datetime
    ) -> None:
        expires = timestamp_pb2.Timestamp()
        expires.FromDatetime(expire_time)
        try:
            self._stub.ReserveDiamonds(
                wpb.ReserveDiamondsRequest(
                    request_id=request_id,
                    account_id=account_id,
                    diamonds=diamonds,
                    reservation_id=reservation_id,
                    expire_time=expires,
                )
            )
        except grpc.RpcError as error:
            raise _translate(error) from None

    def commit(self, request_id: str, reservation_id: str) -> str:
        try:
            self._stub.CommitReservation(
                wpb.CommitReservationRequest(request_id=request_id, reservation_id=reservation_id)
            )
        except grpc.RpcError as error:
            translated = _translate(error)
            if isinstance(translated, Unavailable):
                raise translated from None
            reason = error_info(error)[0] or error.code().name
            return "" if reason in _DONE_ON_COMMIT else reason
        return ""

    def release(self, request_id: str, reservation_id: str, reason: str) -> str:
        try:
            self._stub.ReleaseReservation(
                wpb.ReleaseReservationRequest(request_id=request_id, reservation_id=reservation_id, reason=reason[:256])
            )
        except grpc.RpcError as error:
            translated = _translate(error)
            if isinstance(translated, Unavailable):
                raise translated from None
            refusal = error_info(error)[0] or error.code().name
            return "" if refusal in _DONE_ON_RELEASE else refusal
        return ""
