"""Thin gRPC servicer of the payouts service: validate, call the domain, map back."""

from __future__ import annotations

import re
from datetime import UTC
from typing import Any

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc
from services.common import validation as v
from services.common.actor import Actor
from services.common.db import Database
from services.payouts import convert
from services.payouts.domain.model import Destination
from services.payouts.domain.service import Payouts
from services.payouts.errors import InvalidArgument
from services.payouts.store import RequestKey

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
MAX_RECEIVER = 254


def _destination(field: str, value: pb.PayoutDestination) -> tuple[str, str]:
    provider = v.require_enum(f"{field}.provider", value.provider, convert.PROVIDERS)
    receiver = v.require_text(f"{field}.receiver", value.receiver.strip(), MAX_RECEIVER)
    if provider == "paypal" and not _EMAIL.match(receiver):
        raise InvalidArgument(f"{field}.receiver", "must be the PayPal account's e-mail address")
    return provider, receiver


def _key(method: str, request: Any, render: Any) -> RequestKey:
    """Read on the event loop, where the caller is known (the store runs on another thread)."""
    request_id = v.require_id("request_id", request.request_id)
    return RequestKey(method, request_id, request, render, Actor.of_request(request_id))


MAX_DESTINATION_CHANGES = 20


_MAX_TIMESTAMP_SECONDS = 253402300799  # 9999-12-31T23:59:59Z


class PayoutServiceServicer(pb_grpc.PayoutServiceServicer):
    def __init__(self, payouts: Payouts, database: Database) -> None:
        self._payouts = payouts
        self._db = database

    async def SetPayoutDestination(
        self, request: pb.SetPayoutDestinationRequest, context: Any
    ) -> pb.SetPayoutDestinationResponse:
        key = _key(
            "SetPayoutDestination",
            request,
            lambda d: pb.SetPayoutDestinationResponse(destination=convert.destination(d)),
        )
        creator = v.require_id("creator_account_id", request.creator_account_id)
        if not request.HasField("destination"):
            raise InvalidArgument("destination", "is required")
        provider, receiver = _destination("destination", request.destination)
        raw = await self._db.run(self._payouts.set_destination, key, creator, provider, receiver)
        return pb.SetPayoutDestinationResponse.FromString(raw)

    async def VerifyPayoutDestination(
        self, request: pb.VerifyPayoutDestinationRequest, context: Any
    ) -> pb.VerifyPayoutDestinationResponse:
        key = _key(
            "VerifyPayoutDestination",
            request,
            lambda d: pb.VerifyPayoutDestinationResponse(destination=convert.destination(d)),
        )
        creator = v.require_id("creator_account_id", request.creator_account_id)
        provider, receiver = _destination(
            "destination", pb.PayoutDestination(provider=request.provider, receiver=request.receiver)
        )
        raw = await self._db.run(self._payouts.verify_destination, key, creator, provider, receiver)
        return pb.VerifyPayoutDestinationResponse.FromString(raw)

    async def GetPayoutDestination(
        self, request: pb.GetPayoutDestinationRequest, context: Any
    ) -> pb.GetPayoutDestinationResponse:
        creator = v.require_id("creator_account_id", request.creator_account_id)
        current, changes = await self._db.run(self._payouts.destination_history, creator, MAX_DESTINATION_CHANGES)
        return pb.GetPayoutDestinationResponse(
            destination=convert.destination(current), changes=[convert.destination_change(c) for c in changes]
        )

    async def RequestCashout(self, request: pb.RequestCashoutRequest, context: Any) -> pb.RequestCashoutResponse:
        key = _key("RequestCashout", request, lambda c: pb.RequestCashoutResponse(cashout=convert.cashout(c)))
        creator = v.require_id("creator_account_id", request.creator_account_id)
        diamonds = v.require_positive("diamonds", request.diamonds)
        destination = None
        if request.HasField("destination"):
            provider, receiver = _destination("destination", request.destination)
            destination = Destination(creator, provider, receiver, False)
        if request.currency_code:
            v.require_currency("currency_code", request.currency_code)
        raw = await self._db.run(
            self._payouts.request_cashout, key, creator, diamonds, destination, request.currency_code
        )
        return pb.RequestCashoutResponse.FromString(raw)

    async def GetCashout(self, request: pb.GetCashoutRequest, context: Any) -> pb.GetCashoutResponse:
        cashout_id = v.require_id("cashout_id", request.cashout_id)
        found = await self._db.run(self._payouts.get_cashout, cashout_id)
        return pb.GetCashoutResponse(cashout=convert.cashout(found))

    async def ListCashouts(self, request: pb.ListCashoutsRequest, context: Any) -> pb.ListCashoutsResponse:
        creator = v.require_id("creator_account_id", request.creator_account_id)
        size = v.page_size("page_size", request.page_size)
        items, token = await self._db.run(self._payouts.list_cashouts, creator, size, request.page_token)
        return pb.ListCashoutsResponse(cashouts=[convert.cashout(c) for c in items], next_page_token=token)

    async def CancelCashout(self, request: pb.CancelCashoutRequest, context: Any) -> pb.CancelCashoutResponse:
        key = _key("CancelCashout", request, lambda c: pb.CancelCashoutResponse(cashout=convert.cashout(c)))
        cashout_id = v.require_id("cashout_id", request.cashout_id)
        raw = await self._db.run(self._payouts.cancel_cashout, key, cashout_id)
        return pb.CancelCashoutResponse.FromString(raw)

    async def CreatePayoutBatch(
        self, request: pb.CreatePayoutBatchRequest, context: Any
    ) -> pb.CreatePayoutBatchResponse:
        key = _key("CreatePayoutBatch", request, lambda b: pb.CreatePayoutBatchResponse(batch=convert.batch(b)))
        if request.currency_code:
            v.require_currency("currency_code", request.currency_code)
        max_items = v.require_non_negative("max_items", request.max_items)
        cutoff = None
        if request.HasField("cutoff_time"):
            if not 0 < request.cutoff_time.seconds <= _MAX_TIMESTAMP_SECONDS:
                raise InvalidArgument("cutoff_time", "must be a time between 1970 and 9999")
            cutoff = request.cutoff_time.ToDatetime(tzinfo=UTC)
        if request.dry_run:
            currency, count, diamonds, amount = await self._db.run(
                self._payouts.preview_batch, request.currency_code, cutoff, max_items
            )
            return pb.CreatePayoutBatchResponse(
                batch=pb.PayoutBatch(
                    currency_code=currency,
                    item_count=count,
                    diamonds=diamonds,
                    amount=convert.money(amount, currency),
                    cutoff_time=request.cutoff_time if cutoff else None,
                )
            )
        raw, _batch_id = await self._db.run(self._payouts.create_batch, key, request.currency_code, cutoff, max_items)
        return pb.CreatePayoutBatchResponse.FromString(raw)

    async def GetPayoutBatch(self, request: pb.GetPayoutBatchRequest, context: Any) -> pb.GetPayoutBatchResponse:
        batch_id = v.require_id("batch_id", request.batch_id)
        found = await self._db.run(self._payouts.get_batch, batch_id)
        return pb.GetPayoutBatchResponse(batch=convert.batch(found))

    async def ListPayoutBatches(
        self, request: pb.ListPayoutBatchesRequest, context: Any
    ) -> pb.ListPayoutBatchesResponse:
        size = v.page_size("page_size", request.page_size)
        items, token = await self._db.run(self._payouts.list_batches, size, request.page_token)
        return pb.ListPayoutBatchesResponse(batches=[convert.batch(b) for b in items], next_page_token=token)

    async def RetryFailedItems(self, request: pb.RetryFailedItemsRequest, context: Any) -> pb.RetryFailedItemsResponse:
        key = _key(
            "RetryFailedItems",
            request,
            lambda r: pb.RetryFailedItemsResponse(retried_count=r[0], batch=convert.batch(r[1])),
        )
        batch_id = v.require_id("batch_id", request.batch_id)
        raw = await self._db.run(self._payouts.retry_failed, key, batch_id)
        return pb.RetryFailedItemsResponse.FromString(raw)

    async def CancelPayoutBatch(
        self, request: pb.CancelPayoutBatchRequest, context: Any
    ) -> pb.CancelPayoutBatchResponse:
        key = _key("CancelPayoutBatch", request, lambda b: pb.CancelPayoutBatchResponse(batch=convert.batch(b)))
        batch_id = v.require_id("batch_id", request.batch_id)
        raw = await self._db.run(self._payouts.cancel_batch, key, batch_id)
        return pb.CancelPayoutBatchResponse.FromString(raw)

    async def ListBatchItems(self, request: pb.ListBatchItemsRequest, context: Any) -> pb.ListBatchItemsResponse:
        batch_id = v.require_id("batch_id", request.batch_id)
        size = v.page_size("page_size", request.page_size, default=500, maximum=1000)
        items, token = await self._db.run(self._payouts.list_batch_items, batch_id, size, request.page_token)
        return pb.ListBatchItemsResponse(cashouts=[convert.cashout(c) for c in items], next_page_token=token)
