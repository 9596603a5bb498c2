"""Gifts, spending, limits and history through a real server, with real concurrency."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as pb_grpc
from services.wallet.audit import audit
from tests.support.databases import on_the_cursor
from tests.support.status import error_info
from tests.support.tokens import Keys
from tests.wallet.support import Wallet, running_wallet, unique


async def refused(call: object, code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    assert error_info(caught.value).reason == reason
    return caught.value


async def test_gift_turns_coins_into_diamonds(wallet: Wallet) -> None:
    await wallet.credit("fan", 100)
    reply = await wallet.gift("fan", "creator", "panda", count=3)
    assert (reply.coins_spent, reply.diamonds_to_creator, reply.sender_balance.coins) == (15, 15, 85)
    creator = await wallet.balance("creator")
    assert (creator.diamonds, creator.diamonds_withdrawable, creator.coins) == (15, 15, 0)
    assert audit(wallet.database) == []


async def test_rational_rate_rounds_down_per_gift(database_url: str, keys: Keys, tmp_path: Path) -> None:
    async with running_wallet(database_url, keys, tmp_path, per_coin="1/2") as wallet:
        await wallet.credit("fan", 100)
        reply = await wallet.gift("fan", "creator", "odd", count=4)  # 3 coins -> 1 diamond each
        assert (reply.coins_spent, reply.diamonds_to_creator) == (12, 4)
        gifts = await wallet.stub.ListGifts(pb.ListGiftsRequest(), metadata=wallet.md("wallet:read"))
        assert [(g.gift_id, g.coin_price, g.diamonds_to_creator) for g in gifts.gifts] == [
            ("rose", 1, 0),
            ("panda", 5, 2),
            ("odd", 3, 1),
        ]
        assert audit(wallet.database) == []


@pytest.mark.postgres
async def test_credits_gifts_and_spends_run_past_sqlalchemy(
    postgres_url: str, keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Their batch statements run on the psycopg cursor (services.common.bulk); one that needs
    SQLAlchemy's execution layer (an IN list given per call, a converting type) costs twice the CPU."""
    with on_the_cursor(caplog):
        async with running_wallet(postgres_url, keys, tmp_path) as wallet:
            await wallet.credit("fan", 100)
            await wallet.gift("fan", "creator", "panda", count=3)
            request = pb.SpendCoinsRequest(request_id=unique("sp"), account_id="fan", purpose="PROMOTE", coins=5)
            await wallet.stub.SpendCoins(request, metadata=wallet.md())
            assert (await wallet.balance("fan")).coins == 80


async def test_gift_refusals(wallet: Wallet) -> None:
    await wallet.credit("fan", 3)
    error = await refused(wallet.gift("fan", "fan"), grpc.StatusCode.INVALID_ARGUMENT, "SELF_GIFT")
    assert error_info(error).metadata["field"] == "creator_account_id"
    await refused(wallet.gift("fan", "creator", "unicorn"), grpc.StatusCode.NOT_FOUND, "GIFT_NOT_FOUND")
    await refused(wallet.gift("fan", "creator", "panda"), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_COINS")
    await refused(wallet.gift("nobody", "creator"), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_COINS")
    assert (await wallet.balance("fan")).coins == 3


async def test_gift_request_id_replay(wallet: Wallet) -> None:
    await wallet.credit("fan", 10)
    first = await wallet.gift("fan", "creator", request_id="gift-1")
    again = await wallet.gift("fan", "creator", request_id="gift-1")
    assert again == first
    await refused(
        wallet.gift("fan", "creator", "panda", request_id="gift-1"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REQUEST_ID_REUSED",
    )
    assert (await wallet.balance("fan")).coins == 9
    assert (await wallet.balance("creator")).diamonds == 1


async def test_refused_gift_can_be_retried_with_the_same_request_id(wallet: Wallet) -> None:
    await refused(
        wallet.gift("fan", "creator", request_id="g-1"), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_COINS"
    )
    await wallet.credit("fan", 1)
    assert (await wallet.gift("fan", "creator", request_id="g-1")).coins_spent == 1


async def test_concurrent_gifts_from_one_sender_never_overdraw(wallet: Wallet) -> None:
    await wallet.credit("fan", 100)
    # Several channels (connections), 250 gifts of 1 coin racing for 100 coins.
    channels = [grpc.aio.insecure_channel(wallet.address) for _ in range(5)]
    try:
        stubs = [pb_grpc.WalletServiceStub(c) for c in channels]

        async def one(i: int) -> pb.SendGiftResponse:
            return await stubs[i % len(stubs)].SendGift(
                pb.SendGiftRequest(
                    request_id=f"race-{i}",
                    sender_account_id="fan",
                    creator_account_id=f"c{i % 7}",
                    gift_id="rose",
                    count=1,
                ),
                metadata=wallet.md(),
                timeout=60,
            )

        results = await asyncio.gather(*(one(i) for i in range(250)), return_exceptions=True)
    finally:
        for channel in channels:
            await channel.close(None)
    sent = [r for r in results if isinstance(r, pb.SendGiftResponse)]
    failed = [r for r in results if not isinstance(r, pb.SendGiftResponse)]
    assert len(sent) == 100
    assert all(isinstance(f, grpc.aio.AioRpcError) and error_info(f).reason == "INSUFFICIENT_COINS" for f in failed)
    assert sorted(r.sender_balance.coins for r in sent) == list(range(100))
    assert (await wallet.balance("fan")).coins == 0
    assert sum([(await wallet.balance(f"c{i}")).diamonds for i in range(7)]) == 100
    assert audit(wallet.database) == []


async def test_concurrent_gifts_to_one_creator_all_land(wallet: Wallet) -> None:
    senders = [f"fan-{i}" for i in range(200)]
    await asyncio.gather(*(wallet.credit(s, 10) for s in senders))
    results = await asyncio.gather(*(wallet.gift(s, "star", "panda") for s in senders))
    assert all(r.coins_spent == 5 for r in results)
    assert len({r.transaction_id for r in results}) == 200
    assert (await wallet.balance("star")).diamonds == 1000
    assert audit(wallet.database) == []


async def test_one_transaction_per_gift_mode(database_url: str, keys: Keys, tmp_path: Path) -> None:
    async with running_wallet(database_url, keys, tmp_path, wallet_group_commit_window_ms=0.0) as wallet:
        senders = [f"fan-{i}" for i in range(40)]
        await asyncio.gather(*(wallet.credit(s, 2) for s in senders))
        await asyncio.gather(*(wallet.gift(s, "star") for s in senders))
        assert (await wallet.balance("star")).diamonds == 40
        assert audit(wallet.database) == []


async def test_spend_coins(wallet: Wallet) -> None:
    await wallet.credit("fan", 20)
    request = pb.SpendCoinsRequest(
        request_id="sp-1", account_id="fan", purpose="PROMOTE", coins=15, reference="video-9"
    )
    reply = await wallet.stub.SpendCoins(request, metadata=wallet.md())
    assert (reply.coins_spent, reply.balance.coins) == (15, 5)
    assert await wallet.stub.SpendCoins(request, metadata=wallet.md()) == reply
    await refused(
        wallet.stub.SpendCoins(
            pb.SpendCoinsRequest(request_id="sp-2", account_id="fan", purpose="PROMOTE", coins=6), metadata=wallet.md()
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_COINS",
    )
    history = await wallet.stub.ListTransactions(pb.ListTransactionsRequest(account_id="fan"), metadata=wallet.md())
    assert [t.kind for t in history.transactions] == [pb.TRANSACTION_KIND_SPEND, pb.TRANSACTION_KIND_PURCHASE]
    assert history.transactions[0].coins_delta == -15
    assert history.transactions[0].reference == "PROMOTE:video-9"


async def set_limit(wallet: Wallet, period: int, coins: int) -> pb.SetSpendingLimitResponse:
    return await wallet.stub.SetSpendingLimit(
        pb.SetSpendingLimitRequest(request_id=unique("lim"), account_id="fan", period=period, limit_coins=coins),  # type: ignore[arg-type]
        metadata=wallet.md("wallet:limits"),
    )


async def test_spending_limits(wallet: Wallet) -> None:
    await wallet.credit("fan", 1000)
    lowered = await set_limit(wallet, pb.LIMIT_PERIOD_DAILY, 12)
    assert lowered.effective_now
    assert lowered.limit.limit_coins == 12
    await wallet.gift("fan", "creator", "panda", count=2)
    error = await refused(
        wallet.gift("fan", "creator", "panda"), grpc.StatusCode.FAILED_PRECONDITION, "SPENDING_LIMIT_EXCEEDED"
    )
    assert error_info(error).metadata["period"] == "DAILY"
    await wallet.gift("fan", "creator", "rose", count=2)  # exactly the budget
    # Raising waits out the cool-off; it is reported, and the old limit still applies.
    raised = await set_limit(wallet, pb.LIMIT_PERIOD_DAILY, 500)
    assert not raised.effective_now
    assert raised.limit.limit_coins == 12
    assert raised.limit.pending_change.limit_coins == 500
    assert raised.effective_time.ToSeconds() - lowered.effective_time.ToSeconds() >= 24 * 3600 - 5
    await refused(wallet.gift("fan", "creator", "rose"), grpc.StatusCode.FAILED_PRECONDITION, "SPENDING_LIMIT_EXCEEDED")
    removed = await set_limit(wallet, pb.LIMIT_PERIOD_WEEKLY, 0)
    assert removed.effective_now  # there was no weekly limit: nothing to wait for
    limits = await wallet.stub.GetSpendingLimits(
        pb.GetSpendingLimitsRequest(account_id="fan"), metadata=wallet.md("wallet:limits")
    )
    daily = {limit.period: limit for limit in limits.limits}[pb.LIMIT_PERIOD_DAILY]
    assert (daily.limit_coins, daily.spent_coins, daily.pending_change.limit_coins) == (12, 12, 500)
    # Lowering again takes effect at once and cancels the pending raise.
    again = await set_limit(wallet, pb.LIMIT_PERIOD_DAILY, 10)
    assert again.effective_now
    assert not again.limit.HasField("pending_change")


async def test_concurrent_gifts_respect_the_limit(wallet: Wallet) -> None:
    await wallet.credit("fan", 1000)
    await set_limit(wallet, pb.LIMIT_PERIOD_MONTHLY, 30)
    results = await asyncio.gather(*(wallet.gift("fan", f"c{i}") for i in range(60)), return_exceptions=True)
    sent = [r for r in results if isinstance(r, pb.SendGiftResponse)]
    refusals = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert (len(sent), len(refusals)) == (30, 30), results
    # Every other gift was refused by the budget, not by something else, and none of them moved a coin.
    assert {(r.code(), error_info(r).reason, error_info(r).metadata["period"]) for r in refusals} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "SPENDING_LIMIT_EXCEEDED", "MONTHLY")
    }
    assert (await wallet.balance("fan")).coins == 970
    creators = [await wallet.balance(f"c{i}") for i in range(60)]
    assert sum(c.diamonds for c in creators) == 30
    limits = await wallet.stub.GetSpendingLimits(
        pb.GetSpendingLimitsRequest(account_id="fan"), metadata=wallet.md("wallet:limits")
    )
    monthly = {limit.period: limit for limit in limits.limits}[pb.LIMIT_PERIOD_MONTHLY]
    assert (monthly.limit_coins, monthly.spent_coins) == (30, 30)
    assert audit(wallet.database) == []


async def test_history_pages_newest_first_and_stable(wallet: Wallet) -> None:
    await wallet.credit("fan", 100)
    for _ in range(5):
        await wallet.gift("fan", "creator")
    page = await wallet.stub.ListTransactions(
        pb.ListTransactionsRequest(account_id="fan", page_size=2), metadata=wallet.md()
    )
    seen = [t.transaction_id for t in page.transactions]
    # New writes between pages never shift what the next page returns.
    for _ in range(3):
        await wallet.gift("fan", "creator")
    while page.next_page_token:
        page = await wallet.stub.ListTransactions(
            pb.ListTransactionsRequest(account_id="fan", page_size=2, page_token=page.next_page_token),
            metadata=wallet.md(),
        )
        seen += [t.transaction_id for t in page.transactions]
    assert len(seen) == 6 == len(set(seen))
    everything = await wallet.stub.ListTransactions(pb.ListTransactionsRequest(account_id="fan"), metadata=wallet.md())
    ids = [t.transaction_id for t in everything.transactions]
    assert ids[3:] == seen[:6]
    assert len(ids) == 9
    received = await wallet.stub.ListTransactions(
        pb.ListTransactionsRequest(account_id="creator", kinds=[pb.TRANSACTION_KIND_GIFT_RECEIVED]),
        metadata=wallet.md(),
    )
    assert len(received.transactions) == 8
    assert all(t.counterparty_account_id == "fan" and t.diamonds_delta == 1 for t in received.transactions)
    purchases = await wallet.stub.ListTransactions(
        pb.ListTransactionsRequest(account_id="fan", kinds=[pb.TRANSACTION_KIND_PURCHASE]), metadata=wallet.md()
    )
    assert [t.coins_delta for t in purchases.transactions] == [100]
    later = everything.transactions[0].create_time
    window = await wallet.stub.ListTransactions(
        pb.ListTransactionsRequest(account_id="fan", end_time=later), metadata=wallet.md()
    )
    assert all(t.create_time.ToNanoseconds() < later.ToNanoseconds() for t in window.transactions)
