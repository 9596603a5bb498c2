"""The wallet port over gRPC (coinstore.wallet.v1 ReserveDiamonds, SubmitReservations, SettleReservations)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2

from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as wpb_grpc
from services.common.auth import TokenSource
from services.common.clients import error_info, sync_channel
from services.payouts.domain.model import Settlement, WalletAction
from services.payouts.domain.ports import HoldAnswer
from services.payouts.errors import FailedPrecondition, NotFound, Unavailable

# A batch of up to 15,000 holds is one database transaction in the wallet.
BATCH_TIMEOUT_SECONDS = 60.0
_RETRYABLE = {"UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
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
    def __init__(self, address: str, tokens: TokenSource, timeout_seconds: float = 10.0) -> None:
        self._channel = sync_channel(address, tokens, timeout_seconds)
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

    def submit(self, holds: Sequence[tuple[str, int]]) -> list[HoldAnswer]:
        try:
            reply = self._stub.SubmitReservations(
                wpb.SubmitReservationsRequest(items=[wpb.SubmitItem(reservation_id=r, diamonds=d) for r, d in holds]),
                timeout=BATCH_TIMEOUT_SECONDS,
            )
        except grpc.RpcError as error:
            raise _translate(error) from None
        return [
            HoldAnswer(reservation_id, result.error_reason, result.reservation.diamonds)
            for (reservation_id, _), result in zip(holds, reply.results, strict=True)
        ]

    def settle(self, items: Sequence[Settlement]) -> list[str | None]:
        request = wpb.SettleReservationsRequest(
            items=[
                wpb.SettleItem(
                    request_id=settle_request_id(item),
                    reservation_id=item.reservation_id,
                    action=wpb.SettleItem.ACTION_COMMIT
                    if item.action is WalletAction.COMMIT
                    else wpb.SettleItem.ACTION_RELEASE,
                    diamonds=item.diamonds if item.action is WalletAction.COMMIT else 0,
                    reason=item.reason[:256] if item.action is WalletAction.RELEASE else "",
                )
                for item in items
            ]
        )
        try:
            reply = self._stub.SettleReservations(request, timeout=BATCH_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            raise _translate(error) from None
        answers: list[str | None] = []
        for item, result in zip(items, reply.results, strict=True):
            done = _DONE_ON_COMMIT if item.action is WalletAction.COMMIT else _DONE_ON_RELEASE
            if not result.error_reason or result.error_reason in done:
                answers.append("")
            elif result.error_code in _RETRYABLE:
                answers.append(None)
            else:
                answers.append(result.error_reason)
        return answers


def settle_request_id(item: Settlement) -> str:
    """One exactly-once key per hold and action (the same key the single calls used)."""
    return f"{item.action.value.lower()}:{item.reservation_id}"
