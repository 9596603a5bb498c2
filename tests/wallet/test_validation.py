# mypy: disable-error-code="arg-type,list-item"
# (this file sends raw and unknown enum numbers on purpose)
"""Every bad input is INVALID_ARGUMENT naming the field (never INTERNAL), on each backend."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from coinstore.type.v1 import money_pb2
from coinstore.wallet.v1 import wallet_service_pb2 as pb
from tests.support.status import bad_field, error_info
from tests.wallet.support import Wallet, credit_request

LONG = "x" * 129


def reverse(**changes: Any) -> pb.ReversePurchaseRequest:
    fields: dict[str, Any] = {
        "request_id": "r",
        "store": 1,
        "environment": 1,
        "store_transaction_id": "s",
        "full_refund": True,
        **changes,
    }
    return pb.ReversePurchaseRequest(**fields)


def credit(**changes: Any) -> pb.CreditPurchaseRequest:
    request = credit_request("fan", 100, stx="stx-1", request_id="r-1")
    for name, value in changes.items():
        if name in ("price", "purchase_time"):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    if changes.get("price") is None and "price" in changes:
        request.ClearField("price")
    return request


def gift(**changes: Any) -> pb.SendGiftRequest:
    fields = {
        "request_id": "g-1",
        "sender_account_id": "fan",
        "creator_account_id": "star",
        "gift_id": "rose",
        "count": 1,
    }
    fields.update(changes)
    return pb.SendGiftRequest(**fields)


def bad_time() -> Timestamp:
    return Timestamp(seconds=-62135596801)


CASES: list[tuple[str, Any, str]] = [
    ("CreditPurchase", credit(request_id=""), "request_id"),
    ("CreditPurchase", credit(account_id=""), "account_id"),
    ("CreditPurchase", credit(account_id=LONG), "account_id"),
    ("CreditPurchase", credit(account_id="#sys/gift_revenue"), "account_id"),
    ("CreditPurchase", credit(account_id="bad id"), "account_id"),
    ("CreditPurchase", credit(store=0), "store"),
    ("CreditPurchase", credit(store=99), "store"),
    ("CreditPurchase", credit(store_transaction_id=""), "store_transaction_id"),
    ("CreditPurchase", credit(store_transaction_id="x" * 513), "store_transaction_id"),
    ("CreditPurchase", credit(product_id=""), "product_id"),
    ("CreditPurchase", credit(coins=0), "coins"),
    ("CreditPurchase", credit(coins=-5), "coins"),
    ("CreditPurchase", credit(bonus_coins=-1), "bonus_coins"),
    ("CreditPurchase", credit(bonus_coins=101), "bonus_coins"),
    ("CreditPurchase", credit(quantity=0), "quantity"),
    ("CreditPurchase", credit(environment=0), "environment"),
    ("CreditPurchase", credit(environment=7), "environment"),
    ("CreditPurchase", credit(storefront="x" * 17), "storefront"),
    ("CreditPurchase", credit(price=money_pb2.Money(amount_minor=199, currency_code="usd")), "price.currency_code"),
    ("CreditPurchase", credit(price=money_pb2.Money(amount_minor=199, currency_code="")), "price.currency_code"),
    ("CreditPurchase", credit(price=money_pb2.Money(amount_minor=-1, currency_code="USD")), "price.amount_minor"),
    ("CreditPurchase", credit(purchase_time=bad_time()), "purchase_time"),
    ("ReversePurchase", reverse(store_transaction_id=""), "store_transaction_id"),
    ("ReversePurchase", reverse(request_id=""), "request_id"),
    ("ReversePurchase", reverse(store=0), "store"),
    ("ReversePurchase", reverse(environment=0), "environment"),
    ("ReversePurchase", reverse(full_refund=False, refunded_quantity=-1), "refunded_quantity"),
    ("ReversePurchase", reverse(full_refund=False, refunded_percentage_milli=100_001), "refunded_percentage_milli"),
    ("ReversePurchase", reverse(reason="x" * 513), "reason"),
    # A full refund is said explicitly; saying nothing, or two things, is refused.
    ("ReversePurchase", reverse(full_refund=False), "full_refund"),
    ("ReversePurchase", reverse(refunded_quantity=1), "full_refund"),
    ("ReversePurchase", reverse(full_refund=False, refunded_quantity=1, refunded_percentage_milli=5), "full_refund"),
    (
        "RestorePurchase",
        pb.RestorePurchaseRequest(request_id="r", store=3, environment=1, store_transaction_id="s"),
        "store",
    ),
    ("RestorePurchase", pb.RestorePurchaseRequest(request_id="r", store=1, store_transaction_id="s"), "environment"),
    ("GetPurchaseConsumption", pb.GetPurchaseConsumptionRequest(store=1, store_transaction_id="s"), "environment"),
    ("GetPurchaseConsumption", pb.GetPurchaseConsumptionRequest(store=1, environment=1), "store_transaction_id"),
    ("SendGift", gift(request_id=""), "request_id"),
    ("SendGift", gift(sender_account_id=""), "sender_account_id"),
    ("SendGift", gift(creator_account_id=LONG), "creator_account_id"),
    ("SendGift", gift(gift_id=""), "gift_id"),
    ("SendGift", gift(count=0), "count"),
    ("SendGift", gift(count=-3), "count"),
    ("SendGift", gift(live_stream_id=LONG), "live_stream_id"),
    ("SpendCoins", pb.SpendCoinsRequest(request_id="r", account_id="fan", purpose="PROMOTE", coins=0), "coins"),
    ("SpendCoins", pb.SpendCoinsRequest(request_id="r", account_id="fan", purpose="", coins=1), "purpose"),
    ("SpendCoins", pb.SpendCoinsRequest(request_id="r", account_id="", purpose="PROMOTE", coins=1), "account_id"),
    ("SetSpendingLimit", pb.SetSpendingLimitRequest(request_id="r", account_id="fan", period=0), "period"),
    ("SetSpendingLimit", pb.SetSpendingLimitRequest(request_id="r", account_id="fan", period=9), "period"),
    (
        "SetSpendingLimit",
        pb.SetSpendingLimitRequest(request_id="r", account_id="fan", period=1, limit_coins=-1),
        "limit_coins",
    ),
    ("GetSpendingLimits", pb.GetSpendingLimitsRequest(account_id=""), "account_id"),
    ("GetBalance", pb.GetBalanceRequest(account_id=""), "account_id"),
    ("GetBalance", pb.GetBalanceRequest(account_id=LONG), "account_id"),
    ("ListTransactions", pb.ListTransactionsRequest(account_id="fan", page_size=-1), "page_size"),
    ("ListTransactions", pb.ListTransactionsRequest(account_id="fan", page_token="garbage"), "page_token"),
    ("ListTransactions", pb.ListTransactionsRequest(account_id="fan", kinds=[42]), "kinds"),
    ("ListTransactions", pb.ListTransactionsRequest(account_id="fan", kinds=[0]), "kinds"),
    ("ListTransactions", pb.ListTransactionsRequest(account_id="fan", start_time=bad_time()), "start_time"),
    (
        "ReserveDiamonds",
        pb.ReserveDiamondsRequest(request_id="r", account_id="c", diamonds=0, reservation_id="x"),
        "diamonds",
    ),
    (
        "ReserveDiamonds",
        pb.ReserveDiamondsRequest(request_id="r", account_id="c", diamonds=1, reservation_id=""),
        "reservation_id",
    ),
    (
        "ReserveDiamonds",
        pb.ReserveDiamondsRequest(
            request_id="r", account_id="c", diamonds=1, reservation_id="x", expire_time=Timestamp(seconds=1)
        ),
        "expire_time",
    ),
    ("CommitReservation", pb.CommitReservationRequest(request_id="", reservation_id="x"), "request_id"),
    ("CommitReservation", pb.CommitReservationRequest(request_id="r", reservation_id=""), "reservation_id"),
    ("ReleaseReservation", pb.ReleaseReservationRequest(request_id="r", reservation_id=LONG), "reservation_id"),
]


async def test_bad_inputs_are_invalid_argument_naming_the_field(wallet: Wallet) -> None:
    problems = []
    for method, request, field in CASES:
        try:
            await getattr(wallet.stub, method)(request, metadata=wallet.md(), timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                problems.append(f"{method} {field}: {error.code()} {error.details()}")
                continue
            if error_info(error).reason != "INVALID_ARGUMENT":
                problems.append(f"{method} {field}: reason {error_info(error).reason}")
            if bad_field(error) != field:
                problems.append(f"{method}: named {bad_field(error)!r}, expected {field!r}")
        else:
            problems.append(f"{method} {field}: accepted")
    assert not problems, "\n".join(problems)


async def test_page_size_bounds(wallet: Wallet) -> None:
    """0 means 50, at most 500 per page (a larger size is capped, not refused)."""
    await asyncio.gather(*(wallet.credit("fan", 1, stx=f"page-{i}") for i in range(501)))

    async def page(size: int) -> pb.ListTransactionsResponse:
        request = pb.ListTransactionsRequest(account_id="fan", page_size=size)
        reply: pb.ListTransactionsResponse = await wallet.stub.ListTransactions(request, metadata=wallet.md())
        return reply

    for size, expected in ((1, 1), (0, 50), (500, 500), (10_000, 500)):
        reply = await page(size)
        assert len(reply.transactions) == expected, size
        assert reply.next_page_token
    rest = await wallet.stub.ListTransactions(
        pb.ListTransactionsRequest(account_id="fan", page_size=500, page_token=(await page(500)).next_page_token),
        metadata=wallet.md(),
    )
    assert (len(rest.transactions), rest.next_page_token) == (1, "")
