"""The purchases core's client of the wallet's CreditPurchase (or CreditPurchases,
batched), ReversePurchase and RestorePurchase: typed requests in, typed answers out, the wallet's errors
mapped to receipts errors.

The wallet guarantees exactly once per (store, store_transaction_id). Its
failures map as: UNAVAILABLE, DEADLINE_EXCEEDED and anything unexpected →
UNAVAILABLE ``WALLET_UNAVAILABLE`` (retrying the verification is safe);
PERMISSION_DENIED, FAILED_PRECONDITION, NOT_FOUND and ABORTED keep their code
and the wallet's ErrorInfo reason (e.g. ``RECEIPT_BOUND_TO_OTHER_ACCOUNT``).
Request ids are derived from the caller's, so a repeated call is the same call.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as wpb_grpc
from services.common.catalog import StoreId
from services.common.clients import error_info
from services.common.errors import DomainError
from services.common.group_commit import Batching, GroupCommit
from services.receipts.convert import money, timestamp
from services.receipts.errors import Aborted, FailedPrecondition, NotFound, PermissionDenied, Unavailable
from services.receipts.purchases.model import CreditTerms, Environment, Refund

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Message)
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}

WALLET_STORE = {StoreId.APP_STORE: wpb.STORE_APP_STORE, StoreId.GOOGLE_PLAY: wpb.STORE_GOOGLE_PLAY}
WALLET_ENVIRONMENT = {
    Environment.PRODUCTION: wpb.STORE_ENVIRONMENT_PRODUCTION,
    Environment.SANDBOX: wpb.STORE_ENVIRONMENT_SANDBOX,
}
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
    reason, metadata = error_info(error)
    return _mapped(error.code(), reason, error.details() or "", metadata)


def _mapped(code: grpc.StatusCode, reason: str, details: str, metadata: dict[str, str]) -> DomainError:
    mapped = _PASS_THROUGH.get(code)
    if mapped is not None:
        return mapped(reason or code.name, f"wallet: {details}", metadata)
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        log.error("wallet answered %s (%s): %s", code.name, reason, details)
    metadata = {"wallet_code": code.name, **({"wallet_reason": reason} if reason else {})}
    return Unavailable("WALLET_UNAVAILABLE", "the wallet is unavailable; retry later", metadata)


def refusal_reason(error: DomainError) -> str | None:
    """The reason when the wallet refused a credit for good (asking again cannot help: the
    purchase or its request is wrong for the wallet); None for what a retry may cure
    (unavailable, deadline, ABORTED, or this key's token refused by the wallet's auth)."""
    if error.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
        return error.reason
    if error.code is grpc.StatusCode.PERMISSION_DENIED and error.reason == "RECEIPT_BOUND_TO_OTHER_ACCOUNT":
        return error.reason
    if error.metadata.get("wallet_code") == grpc.StatusCode.INVALID_ARGUMENT.name:
        return error.metadata.get("wallet_reason") or "INVALID_ARGUMENT"
    return None


def _item_error(error: wpb.ItemError) -> DomainError:
    """A CreditPurchases item's error, mapped as the same CreditPurchase's would be."""
    code = _STATUS_CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    return _mapped(code, error.reason, error.message, dict(error.metadata))


@dataclass(frozen=True)
class Credit:
    """The wallet's answer to a credit: ``new`` is False when it had credited the purchase before."""

    new: bool
    wallet_transaction_id: str
    balance: int


@dataclass(frozen=True)
class Reversal:
    """The wallet's answer to a reversal or a restore (state-based: ``applied`` when coins moved now)."""

    applied: bool
    coins_moved: int
    account_id: str
    balance: int
    # A partial refund that computes to nothing: nothing moved, nothing to record.
    nothing_refunded: bool = False


def _credit(response: wpb.CreditPurchaseResponse) -> Credit:
    return Credit(response.state == wpb.CREDIT_STATE_CREDITED, response.transaction_id, response.balance.coins)


class WalletClient:
    """Typed calls to the wallet over one gRPC channel. With a group-commit window,
    concurrent credits travel together in one CreditPurchases call."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        timeout_seconds: float = 10.0,  # COINSTORE_WALLET_CALL_TIMEOUT_SECONDS
        *,
        batching: Batching = Batching(),
    ) -> None:
        self._channel = channel
        self._stub = wpb_grpc.WalletServiceStub(channel)
        self._timeout = timeout_seconds
        self._credits: GroupCommit[wpb.CreditPurchaseRequest, Credit | DomainError] | None = batching.group(
            self._credit_batch
        )

    async def _call(self, rpc: Callable[..., Awaitable[R]], request: Message) -> R:
        try:
            return await rpc(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise map_wallet_error(error) from None

    async def credit(self, terms: CreditTerms, account_id: str, request_id: str) -> Credit:
        """CreditPurchase of ``terms`` (coins include the bonus) to ``account_id``."""
        purchase = terms.purchase
        request = wpb.CreditPurchaseRequest(
            # The evidence is part of the body, so it is part of the id: a retry that verified a
            # fresh copy (an App Store API answer signed anew) is a new call, answered ALREADY_CREDITED.
            request_id=wallet_request_id(
                "credit",
                request_id,
                purchase.store.value,
                purchase.store_transaction_id,
                *((purchase.evidence_sha256,) if purchase.evidence_sha256 else ()),
            ),
            account_id=account_id,
            store=WALLET_STORE[purchase.store],
            store_transaction_id=purchase.store_transaction_id,
            product_id=purchase.product_id,
            coins=terms.total_coins,
            bonus_coins=terms.bonus_coins,
            quantity=purchase.quantity,
            environment=WALLET_ENVIRONMENT[purchase.environment],
            storefront=purchase.storefront,
            price=money(purchase.price),
            purchase_time=timestamp(purchase.purchase_time),
            flagged_for_review=terms.flagged_for_review,
            evidence_sha256=purchase.evidence_sha256,
        )
        if self._credits is None:
            return _credit(await self._call(self._stub.CreditPurchase, request))
        outcome = await self._credits.submit(request)
        if isinstance(outcome, DomainError):
            raise outcome
        return outcome

    async def _credit_batch(self, requests: list[wpb.CreditPurchaseRequest]) -> list[Credit | DomainError]:
        """One CreditPurchases call; each item answered as its CreditPurchase would be."""
        reply: wpb.CreditPurchasesResponse = await self._call(
            self._stub.CreditPurchases, wpb.CreditPurchasesRequest(requests=requests)
        )
        return [
            _credit(result.response) if result.HasField("response") else _item_error(result.error)
            for result in reply.results
        ]

    async def credited_purchases(
        self, store: StoreId, since: datetime, before: datetime, page_size: int = 500
    ) -> list[wpb.CreditedPurchase]:
        """ListCreditedPurchases, every page: the purchases of ``store`` the wallet credited in [since, before)."""
        found: list[wpb.CreditedPurchase] = []
        after = 0
        while True:
            response: wpb.ListCreditedPurchasesResponse = await self._call(
                self._stub.ListCreditedPurchases,
                wpb.ListCreditedPurchasesRequest(
                    store=WALLET_STORE[store],
                    credited_since=timestamp(since),
                    credited_before=timestamp(before),
                    after_credit_sequence=after,
                    page_size=page_size,
                ),
            )
            found.extend(response.purchases)
            after = response.next_credit_sequence
            if not after:
                return found

    async def consumed_percentage_milli(
        self, store: StoreId, environment: Environment, store_transaction_id: str
    ) -> int:
        """GetPurchaseConsumption: how much of the purchase was used, in milliunits (rounded down)."""
        response: wpb.GetPurchaseConsumptionResponse = await self._call(
            self._stub.GetPurchaseConsumption,
            wpb.GetPurchaseConsumptionRequest(
                store=WALLET_STORE[store],
                environment=WALLET_ENVIRONMENT[environment],
                store_transaction_id=store_transaction_id,
            ),
        )
        return int(response.consumed_percentage_milli)

    async def reverse(self, refund: Refund, environment: Environment, request_id: str) -> Reversal:
        """ReversePurchase: the whole purchase, or the cumulative refunded quantity or share."""
        full = refund.full
        quantity, share = (0, 0) if full else (refund.refunded_quantity, refund.refunded_percentage_milli)
        response: wpb.ReversePurchaseResponse = await self._call(
            self._stub.ReversePurchase,
            wpb.ReversePurchaseRequest(
                request_id=wallet_request_id(
                    "reverse",
                    request_id,
                    refund.store.value,
                    refund.store_transaction_id,
                    "full" if full else str(refund.refunded_quantity),
                    str(refund.refunded_percentage_milli),
                ),
                store=WALLET_STORE[refund.store],
                environment=WALLET_ENVIRONMENT[environment],
                store_transaction_id=refund.store_transaction_id,
                full_refund=full,
                refunded_quantity=quantity,
                refunded_percentage_milli=share,
                reason=refund.reason[:256],
            ),
        )
        applied = response.state == wpb.REVERSAL_STATE_APPLIED
        nothing = response.state == wpb.REVERSAL_STATE_NOTHING_REFUNDED
        return Reversal(applied, response.coins_reversed, response.account_id, response.balance.coins, nothing)

    async def restore(
        self, store: StoreId, store_transaction_id: str, environment: Environment, reason: str, request_id: str
    ) -> Reversal:
        """RestorePurchase: undo the reversals of a purchase whose refund the store reversed."""
        response: wpb.RestorePurchaseResponse = await self._call(
            self._stub.RestorePurchase,
            wpb.RestorePurchaseRequest(
                request_id=wallet_request_id("restore", request_id, store.value, store_transaction_id),
                store=WALLET_STORE[store],
                environment=WALLET_ENVIRONMENT[environment],
                store_transaction_id=store_transaction_id,
                reason=reason[:256],
            ),
        )
        applied = response.state == wpb.REVERSAL_STATE_APPLIED
        return Reversal(applied, response.coins_restored, response.account_id, response.balance.coins)

    async def close(self) -> None:
        await self._channel.close(None)
