"""PayoutService through a real gRPC server on a real socket (wallet: the contract stand-in over gRPC)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from tests.payouts.conftest import Service

EMAIL = "creator@example.com"


def details(error: grpc.aio.AioRpcError) -> tuple[str, str]:
    """(ErrorInfo reason, BadRequest field or "")."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    reason = field = ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            field = bad.field_violations[0].field
    return reason, field


async def refused(call: Any, code: grpc.StatusCode) -> tuple[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return details(caught.value)


def destination(receiver: str = EMAIL) -> pb.PayoutDestination:
    return pb.PayoutDestination(provider=pb.PROVIDER_PAYPAL, receiver=receiver)


async def onboard(service: Service, creator: str, diamonds: int, receiver: str = EMAIL, **wallet: Any) -> None:
    service.wallet.credit(creator, diamonds, **wallet)
    await service.stub.SetPayoutDestination(
        pb.SetPayoutDestinationRequest(
            request_id=f"dest-{creator}", creator_account_id=creator, destination=destination(receiver)
        ),
        metadata=service.creator(),
    )
    await service.stub.VerifyPayoutDestination(
        pb.VerifyPayoutDestinationRequest(
            request_id=f"verify-{creator}", creator_account_id=creator, provider=pb.PROVIDER_PAYPAL, receiver=receiver
        ),
        metadata=service.ops(),
    )


def cashout_request(request_id: str, creator: str, diamonds: int, **extra: Any) -> pb.RequestCashoutRequest:
    return pb.RequestCashoutRequest(request_id=request_id, creator_account_id=creator, diamonds=diamonds, **extra)


async def test_cashout_reserves_diamonds_and_replays(service: Service) -> None:
    await onboard(service, "c1", 30_000)
    reply = await service.stub.RequestCashout(cashout_request("r1", "c1", 10_001), metadata=service.creator())
    cashout = reply.cashout
    assert cashout.state == pb.CASHOUT_STATE_REQUESTED
    assert cashout.amount.amount_minor == 5_000
    assert cashout.amount.currency_code == "USD"
    assert cashout.rate == "0.005"
    # The half cent is not paid, so the diamond that would buy it stays with the creator.
    assert cashout.diamonds == 10_000
    assert service.wallet.balance("c1") == 20_000
    assert service.wallet.holds[cashout.cashout_id].diamonds == 10_000

    again = await service.stub.RequestCashout(cashout_request("r1", "c1", 10_001), metadata=service.creator())
    assert again == reply
    assert service.wallet.balance("c1") == 20_000
    reason, _ = await refused(
        service.stub.RequestCashout(cashout_request("r1", "c1", 12_000), metadata=service.creator()),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "REQUEST_ID_REUSED"

    got = await service.stub.GetCashout(pb.GetCashoutRequest(cashout_id=cashout.cashout_id), metadata=service.creator())
    assert got.cashout == cashout


async def test_destination_must_be_verified_and_match(service: Service) -> None:
    service.wallet.credit("c2", 50_000)
    reason, _ = await refused(
        service.stub.RequestCashout(cashout_request("r-none", "c2", 10_000), metadata=service.creator()),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "DESTINATION_NOT_VERIFIED"
    reply = await service.stub.SetPayoutDestination(
        pb.SetPayoutDestinationRequest(request_id="d2", creator_account_id="c2", destination=destination()),
        metadata=service.creator(),
    )
    assert not reply.destination.verified
    reason, _ = await refused(
        service.stub.RequestCashout(cashout_request("r-unverified", "c2", 10_000), metadata=service.creator()),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "DESTINATION_NOT_VERIFIED"
    # Verifying is an ops action.
    await refused(
        service.stub.VerifyPayoutDestination(
            pb.VerifyPayoutDestinationRequest(
                request_id="v2", creator_account_id="c2", provider=pb.PROVIDER_PAYPAL, receiver=EMAIL
            ),
            metadata=service.creator(),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    verified = await service.stub.VerifyPayoutDestination(
        pb.VerifyPayoutDestinationRequest(
            request_id="v2", creator_account_id="c2", provider=pb.PROVIDER_PAYPAL, receiver=EMAIL
        ),
        metadata=service.ops(),
    )
    assert verified.destination.verified
    reason, _ = await refused(
        service.stub.RequestCashout(
            cashout_request("r-other", "c2", 10_000, destination=destination("else@example.com")),
            metadata=service.creator(),
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "DESTINATION_MISMATCH"
    # Changing the destination drops its verification.
    await service.stub.SetPayoutDestination(
        pb.SetPayoutDestinationRequest(
            request_id="d2b", creator_account_id="c2", destination=destination("new@example.com")
        ),
        metadata=service.creator(),
    )
    reason, _ = await refused(
        service.stub.RequestCashout(cashout_request("r-changed", "c2", 10_000), metadata=service.creator()),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "DESTINATION_NOT_VERIFIED"
    assert service.wallet.balance("c2") == 50_000


@pytest.mark.parametrize(
    ("setup", "diamonds", "reason"),
    [
        ({"diamonds": 50_000}, 9_999, "BELOW_MINIMUM"),
        ({"diamonds": 5_000}, 10_000, "INSUFFICIENT_DIAMONDS"),
        ({"diamonds": 5_000, "immature": 20_000}, 10_000, "DIAMONDS_NOT_MATURE"),
        ({"diamonds": 50_000, "restricted": True}, 10_000, "ACCOUNT_RESTRICTED"),
        ({"diamonds": 500_000}, 200_200, "DAILY_LIMIT_EXCEEDED"),
    ],
)
async def test_refusal_reasons(service: Service, setup: dict[str, Any], diamonds: int, reason: str) -> None:
    await onboard(service, "c3", **setup)
    before = service.wallet.balance("c3")
    got, _ = await refused(
        service.stub.RequestCashout(cashout_request("r3", "c3", diamonds), metadata=service.creator()),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert got == reason
    assert service.wallet.balance("c3") == before
    listed = await service.stub.ListCashouts(
        pb.ListCashoutsRequest(creator_account_id="c3"), metadata=service.creator()
    )
    assert not listed.cashouts


async def test_daily_limit_holds_under_concurrent_requests(service: Service) -> None:
    await onboard(service, "c4", 2_000_000)
    # $300 each against a $1,000 day: only three fit, however the requests interleave.
    calls = [
        service.stub.RequestCashout(cashout_request(f"par-{i}", "c4", 60_000), metadata=service.creator())
        for i in range(8)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    accepted = [r for r in results if isinstance(r, pb.RequestCashoutResponse)]
    refusals = [details(r)[0] for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(accepted) == 3
    assert refusals == ["DAILY_LIMIT_EXCEEDED"] * 5
    assert service.wallet.balance("c4") == 2_000_000 - 3 * 60_000


async def test_cancel_releases_the_reservation_once(service: Service) -> None:
    await onboard(service, "c5", 20_000)
    cashout = (
        await service.stub.RequestCashout(cashout_request("r5", "c5", 10_000), metadata=service.creator())
    ).cashout
    cancel = pb.CancelCashoutRequest(request_id="x5", cashout_id=cashout.cashout_id)
    first = await service.stub.CancelCashout(cancel, metadata=service.creator())
    assert first.cashout.state == pb.CASHOUT_STATE_CANCELLED
    assert await service.stub.CancelCashout(cancel, metadata=service.creator()) == first
    assert service.wallet.balance("c5") == 20_000
    assert service.wallet.releases[cashout.cashout_id] == 1
    reason, _ = await refused(
        service.stub.CancelCashout(
            pb.CancelCashoutRequest(request_id="x5b", cashout_id=cashout.cashout_id), metadata=service.creator()
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "CASHOUT_NOT_CANCELLABLE"
    reason, _ = await refused(
        service.stub.GetCashout(pb.GetCashoutRequest(cashout_id="co_missing"), metadata=service.creator()),
        grpc.StatusCode.NOT_FOUND,
    )
    assert reason == "CASHOUT_NOT_FOUND"


async def test_list_cashouts_pages_newest_first(service: Service) -> None:
    await onboard(service, "c6", 100_000)
    ids = []
    for i in range(5):
        reply = await service.stub.RequestCashout(cashout_request(f"l{i}", "c6", 10_000), metadata=service.creator())
        ids.append(reply.cashout.cashout_id)
    seen: list[str] = []
    token = ""
    while True:
        page = await service.stub.ListCashouts(
            pb.ListCashoutsRequest(creator_account_id="c6", page_size=2, page_token=token), metadata=service.creator()
        )
        assert len(page.cashouts) <= 2
        seen += [c.cashout_id for c in page.cashouts]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))


async def test_batch_dry_run_create_and_cancel(service: Service) -> None:
    await onboard(service, "c7", 100_000)
    for i in range(3):
        await service.stub.RequestCashout(cashout_request(f"b{i}", "c7", 10_000 + i * 200), metadata=service.creator())
    preview = await service.stub.CreatePayoutBatch(
        pb.CreatePayoutBatchRequest(request_id="dry", dry_run=True), metadata=service.ops()
    )
    assert preview.batch.batch_id == ""
    assert (preview.batch.item_count, preview.batch.diamonds, preview.batch.amount.amount_minor) == (3, 30_600, 15_300)
    await refused(
        service.stub.CreatePayoutBatch(pb.CreatePayoutBatchRequest(request_id="b"), metadata=service.creator()),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    created = (
        await service.stub.CreatePayoutBatch(
            pb.CreatePayoutBatchRequest(request_id="b", max_items=2), metadata=service.ops()
        )
    ).batch
    assert created.state == pb.BATCH_STATE_CREATED
    assert created.item_count == 2
    assert [(t.state, t.count) for t in created.totals] == [(pb.CASHOUT_STATE_BATCHED, 2)]
    listed = await service.stub.ListPayoutBatches(pb.ListPayoutBatchesRequest(), metadata=service.ops())
    assert [b.batch_id for b in listed.batches] == [created.batch_id]
    items = await service.stub.ListBatchItems(
        pb.ListBatchItemsRequest(batch_id=created.batch_id), metadata=service.ops()
    )
    assert len(items.cashouts) == 2
    assert all(c.state == pb.CASHOUT_STATE_BATCHED and c.batch_id == created.batch_id for c in items.cashouts)

    cancelled = (
        await service.stub.CancelPayoutBatch(
            pb.CancelPayoutBatchRequest(request_id="cb", batch_id=created.batch_id), metadata=service.ops()
        )
    ).batch
    assert cancelled.state == pb.BATCH_STATE_CANCELLED
    # Its cash-outs are requested again, their diamonds still held for the next batch.
    assert service.wallet.calls == []
    assert {h.state for h in service.wallet.holds.values()} == {wpb.RESERVATION_STATE_HELD}
    assert service.wallet.balance("c7") == 100_000 - 30_600
    again = await service.stub.CreatePayoutBatch(pb.CreatePayoutBatchRequest(request_id="b2"), metadata=service.ops())
    assert again.batch.item_count == 3
    reason, _ = await refused(
        service.stub.CreatePayoutBatch(pb.CreatePayoutBatchRequest(request_id="b3"), metadata=service.ops()),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "NO_ELIGIBLE_CASHOUTS"


async def test_cutoff_time_limits_the_batch(service: Service) -> None:
    await onboard(service, "c8", 100_000)
    await service.stub.RequestCashout(cashout_request("cut", "c8", 10_000), metadata=service.creator())
    early = timestamp_pb2.Timestamp(seconds=1_000_000_000)
    reason, _ = await refused(
        service.stub.CreatePayoutBatch(
            pb.CreatePayoutBatchRequest(request_id="early", cutoff_time=early), metadata=service.ops()
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "NO_ELIGIBLE_CASHOUTS"


BAD_TIME_TOKEN = base64.urlsafe_b64encode(b"not-a-time\x1fcashout-1").decode()
BAD_INPUT = [
    ("RequestCashout", cashout_request("", "c", 10_000), "request_id"),
    ("RequestCashout", cashout_request("r", "", 10_000), "creator_account_id"),
    ("RequestCashout", cashout_request("r", "c", 0), "diamonds"),
    ("RequestCashout", cashout_request("r", "c", -5), "diamonds"),
    ("RequestCashout", cashout_request("r", "c", 10_000, currency_code="usd"), "currency_code"),
    ("RequestCashout", cashout_request("r", "c", 10_000, currency_code="GBP"), "currency_code"),
    (
        "RequestCashout",
        cashout_request("r", "c", 10_000, destination=pb.PayoutDestination(receiver="a@b.co")),
        "destination.provider",
    ),
    (
        "RequestCashout",
        cashout_request("r", "c", 10_000, destination=destination("not-an-email")),
        "destination.receiver",
    ),
    ("SetPayoutDestination", pb.SetPayoutDestinationRequest(request_id="r", creator_account_id="c"), "destination"),
    (
        "SetPayoutDestination",
        pb.SetPayoutDestinationRequest(request_id="r", creator_account_id="c", destination=destination("")),
        "destination.receiver",
    ),
    ("GetCashout", pb.GetCashoutRequest(), "cashout_id"),
    ("ListCashouts", pb.ListCashoutsRequest(), "creator_account_id"),
    ("ListCashouts", pb.ListCashoutsRequest(creator_account_id="c", page_size=-1), "page_size"),
    ("ListCashouts", pb.ListCashoutsRequest(creator_account_id="c", page_token="%%%"), "page_token"),
    # Decodes, but its time is not one: still the caller's bad token, not INTERNAL.
    ("ListCashouts", pb.ListCashoutsRequest(creator_account_id="c", page_token=BAD_TIME_TOKEN), "page_token"),
    ("ListPayoutBatches", pb.ListPayoutBatchesRequest(page_token=BAD_TIME_TOKEN), "page_token"),
    ("CancelCashout", pb.CancelCashoutRequest(request_id="r"), "cashout_id"),
    ("CreatePayoutBatch", pb.CreatePayoutBatchRequest(), "request_id"),
    ("CreatePayoutBatch", pb.CreatePayoutBatchRequest(request_id="r", max_items=-1), "max_items"),
    ("CreatePayoutBatch", pb.CreatePayoutBatchRequest(request_id="r", currency_code="XX"), "currency_code"),
    (
        "CreatePayoutBatch",
        pb.CreatePayoutBatchRequest(request_id="r", cutoff_time=timestamp_pb2.Timestamp(seconds=253402300800)),
        "cutoff_time",
    ),
    ("GetPayoutBatch", pb.GetPayoutBatchRequest(), "batch_id"),
    ("RetryFailedItems", pb.RetryFailedItemsRequest(request_id="r"), "batch_id"),
    ("CancelPayoutBatch", pb.CancelPayoutBatchRequest(batch_id="b"), "request_id"),
    ("ListBatchItems", pb.ListBatchItemsRequest(batch_id="b id"), "batch_id"),
]


@pytest.mark.parametrize(("method", "request_message", "field"), BAD_INPUT, ids=[f"{m}-{f}" for m, _, f in BAD_INPUT])
async def test_bad_input_names_the_field(service: Service, method: str, request_message: Any, field: str) -> None:
    metadata = service.keys.metadata("payouts:request", "payouts:ops")
    reason, got_field = await refused(
        getattr(service.stub, method)(request_message, metadata=metadata), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert got_field == field
    assert reason == "INVALID_ARGUMENT"


async def test_unknown_batch_is_not_found(service: Service) -> None:
    reason, _ = await refused(
        service.stub.GetPayoutBatch(pb.GetPayoutBatchRequest(batch_id="pb_nope"), metadata=service.ops()),
        grpc.StatusCode.NOT_FOUND,
    )
    assert reason == "BATCH_NOT_FOUND"
