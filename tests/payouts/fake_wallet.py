"""An in-memory stand-in for the wallet's reservation contract, served over real gRPC.

Used where the real wallet service is not needed (or not yet available): it keeps
the contract's semantics (idempotent by reservation id, request-id replays,
refusal reasons, SUBMITTED holds) and records every commit and release it receives
(single calls and each item of SettleReservations), before deciding anything, with
its request id. So ``commits[r] == 1``
means payouts sent one commit for ``r``, and a replay after a crash shows up as a
second call: whether that replay was harmless (the same request id) is for the
test to check, the fake does not hide it. (The hold's ``state`` is the contract's
state machine, which by itself can only ever move once.)"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as wpb_grpc

COMMIT = "commit"
RELEASE = "release"
OPEN = (wpb.RESERVATION_STATE_HELD, wpb.RESERVATION_STATE_SUBMITTED)
REFUSALS: dict[int, str] = {
    wpb.RESERVATION_STATE_COMMITTED: "RESERVATION_ALREADY_COMMITTED",
    wpb.RESERVATION_STATE_RELEASED: "RESERVATION_ALREADY_RELEASED",
}


def _abort(context: Any, code: grpc.StatusCode, reason: str, message: str) -> None:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="coinstore"))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[info])
    context.abort_with_status(rpc_status.to_status(status))


@dataclass
class Account:
    withdrawable: int = 0
    immature: int = 0
    restricted: bool = False


@dataclass
class Hold:
    account_id: str
    diamonds: int
    state: wpb.ReservationState.ValueType = wpb.RESERVATION_STATE_HELD
    resolved_by: str = ""


@dataclass(frozen=True)
class Call:
    """One CommitReservation or ReleaseReservation the fake received, refused or not."""

    method: str
    reservation_id: str
    request_id: str


@dataclass
class FakeWallet(wpb_grpc.WalletServiceServicer):
    accounts: dict[str, Account] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    # Every CommitReservation / ReleaseReservation received, by reservation id (replays included).
    commits: Counter[str] = field(default_factory=Counter)
    releases: Counter[str] = field(default_factory=Counter)
    # SubmitReservations received per reservation, and the batch calls themselves.
    submits: Counter[str] = field(default_factory=Counter)
    submit_calls: int = 0
    settle_calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    auth_headers: list[str] = field(default_factory=list)

    def request_ids(self, method: str, reservation_id: str) -> Counter[str]:
        """How many ``method`` calls for the reservation carried each request id."""
        with self.lock:
            return Counter(
                c.request_id for c in self.calls if c.method == method and c.reservation_id == reservation_id
            )

    def state(self, reservation_id: str) -> wpb.ReservationState.ValueType:
        with self.lock:
            return self.holds[reservation_id].state

    def _received(self, method: str, reservation_id: str, request_id: str) -> None:
        with self.lock:
            self.calls.append(Call(method, reservation_id, request_id))
            (self.commits if method == COMMIT else self.releases)[reservation_id] += 1

    def credit(self, account_id: str, diamonds: int, *, immature: int = 0, restricted: bool = False) -> None:
        with self.lock:
            account = self.accounts.setdefault(account_id, Account())
            account.withdrawable += diamonds
            account.immature += immature
            account.restricted = restricted

    def balance(self, account_id: str) -> int:
        with self.lock:
            return self.accounts.get(account_id, Account()).withdrawable

    def _reservation(self, reservation_id: str) -> wpb.Reservation:
        hold = self.holds[reservation_id]
        return wpb.Reservation(
            reservation_id=reservation_id, account_id=hold.account_id, diamonds=hold.diamonds, state=hold.state
        )

    def ReserveDiamonds(self, request: wpb.ReserveDiamondsRequest, context: Any) -> wpb.ReserveDiamondsResponse:
        self.auth_headers.append(dict(context.invocation_metadata()).get("authorization", ""))
        with self.lock:
            if request.reservation_id in self.holds:
                return wpb.ReserveDiamondsResponse(reservation=self._reservation(request.reservation_id))
            account = self.accounts.get(request.account_id, Account())
            if account.restricted:
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_RESTRICTED", "restricted")
            if account.withdrawable < request.diamonds:
                if account.withdrawable + account.immature >= request.diamonds:
                    _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "DIAMONDS_NOT_MATURE", "not mature")
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_DIAMONDS", "insufficient")
            account.withdrawable -= request.diamonds
            self.holds[request.reservation_id] = Hold(request.account_id, request.diamonds)
            return wpb.ReserveDiamondsResponse(reservation=self._reservation(request.reservation_id))

    def _settle(
        self, request_id: str, reservation_id: str, target: wpb.ReservationState.ValueType
    ) -> wpb.Reservation | tuple[grpc.StatusCode, str]:
        with self.lock:
            hold = self.holds.get(reservation_id)
            if hold is None:
                return grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND"
            if hold.state not in OPEN:
                if hold.resolved_by == request_id:
                    return self._reservation(reservation_id)
                return grpc.StatusCode.FAILED_PRECONDITION, REFUSALS.get(int(hold.state), "RESERVATION_EXPIRED")
            hold.state = target
            hold.resolved_by = request_id
            if target == wpb.RESERVATION_STATE_RELEASED:
                self.accounts[hold.account_id].withdrawable += hold.diamonds
            return self._reservation(reservation_id)

    def _resolve(
        self, request_id: str, reservation_id: str, target: wpb.ReservationState.ValueType, context: Any
    ) -> wpb.Reservation:
        outcome = self._settle(request_id, reservation_id, target)
        if isinstance(outcome, tuple):
            _abort(context, outcome[0], outcome[1], outcome[1])
            raise AssertionError("unreachable")
        return outcome

    def CommitReservation(self, request: wpb.CommitReservationRequest, context: Any) -> wpb.CommitReservationResponse:
        self._received(COMMIT, request.reservation_id, request.request_id)
        reservation = self._resolve(
            request.request_id, request.reservation_id, wpb.RESERVATION_STATE_COMMITTED, context
        )
        return wpb.CommitReservationResponse(reservation=reservation)

    def ReleaseReservation(
        self, request: wpb.ReleaseReservationRequest, context: Any
    ) -> wpb.ReleaseReservationResponse:
        self._received(RELEASE, request.reservation_id, request.request_id)
        reservation = self._resolve(request.request_id, request.reservation_id, wpb.RESERVATION_STATE_RELEASED, context)
        return wpb.ReleaseReservationResponse(reservation=reservation)

    def SubmitReservations(
        self, request: wpb.SubmitReservationsRequest, context: Any
    ) -> wpb.SubmitReservationsResponse:
        results = []
        with self.lock:
            self.submit_calls += 1
            for item in request.items:
                self.submits[item.reservation_id] += 1
                hold = self.holds.get(item.reservation_id)
                if hold is None:
                    results.append(wpb.SubmitResult(error_reason="RESERVATION_NOT_FOUND"))
                    continue
                reason = ""
                if hold.state == wpb.RESERVATION_STATE_HELD and hold.diamonds < item.diamonds:
                    reason = "RESERVATION_SHRUNK"
                elif hold.state == wpb.RESERVATION_STATE_HELD:
                    hold.state = wpb.RESERVATION_STATE_SUBMITTED
                elif hold.state != wpb.RESERVATION_STATE_SUBMITTED:
                    reason = REFUSALS.get(int(hold.state), "RESERVATION_EXPIRED")
                results.append(
                    wpb.SubmitResult(reservation=self._reservation(item.reservation_id), error_reason=reason)
                )
        return wpb.SubmitReservationsResponse(results=results)

    def SettleReservations(
        self, request: wpb.SettleReservationsRequest, context: Any
    ) -> wpb.SettleReservationsResponse:
        with self.lock:
            self.settle_calls += 1
        results = []
        for item in request.items:
            commit = item.action == wpb.SettleItem.ACTION_COMMIT
            self._received(COMMIT if commit else RELEASE, item.reservation_id, item.request_id)
            target = wpb.RESERVATION_STATE_COMMITTED if commit else wpb.RESERVATION_STATE_RELEASED
            outcome = self._settle(item.request_id, item.reservation_id, target)
            if isinstance(outcome, tuple):
                results.append(
                    wpb.SettleResult(request_id=item.request_id, error_code=outcome[0].name, error_reason=outcome[1])
                )
            else:
                results.append(wpb.SettleResult(request_id=item.request_id, reservation=outcome))
        return wpb.SettleReservationsResponse(results=results)


class FakeWalletServer:
    def __init__(self) -> None:
        self.wallet = FakeWallet()  # type: ignore[abstract]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        wpb_grpc.add_WalletServiceServicer_to_server(self.wallet, self._server)  # type: ignore[arg-type]
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(0.5)
