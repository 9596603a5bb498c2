"""CreditPurchase, GetBalance and the diamond reservations through a real server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from services.wallet import tables
from services.wallet.audit import audit
from tests.support.status import error_info
from tests.support.tokens import Keys
from tests.wallet.support import Wallet, credit_request, running_wallet, unique


def ledger_sums(wallet: Wallet) -> dict[tuple[str, str], int]:
    entries = tables.entries
    with wallet.database.connect() as conn:
        rows = conn.execute(
            sa.select(entries.c.account_id, entries.c.currency, sa.func.sum(entries.c.amount)).group_by(
                entries.c.account_id, entries.c.currency
            )
        ).all()
    return {(account, currency): int(total) for account, currency, total in rows}


async def test_unknown_account_has_zero_balance(wallet: Wallet) -> None:
    balance = await wallet.balance("nobody")
    assert balance == pb.Balance(account_id="nobody")


async def test_credit_books_store_clearing_and_promotions(wallet: Wallet) -> None:
    reply = await wallet.credit("fan", 110, bonus=10)
    assert reply.state == pb.CREDIT_STATE_CREDITED
    assert (reply.coins_credited, reply.bonus_coins, reply.balance.coins) == (110, 10, 110)
    sandbox = await wallet.credit("fan", 7, environment=pb.STORE_ENVIRONMENT_SANDBOX)
    # Sandbox coins are their own currency: shown apart, never mixed into real coins.
    assert (sandbox.balance.coins, sandbox.balance.sandbox_coins) == (110, 7)
    sums = ledger_sums(wallet)
    assert sums[("fan", "COIN")] == 110
    assert sums[("#sys/purchase_clearing/app_store", "COIN")] == -100
    assert sums[("#sys/promotions_expense", "COIN")] == -10
    # ... issued from their own clearing account, out of revenue figures.
    assert sums[("fan", "SANDBOX_COIN")] == 7
    assert sums[("#sys/purchase_clearing/app_store/sandbox", "SANDBOX_COIN")] == -7
    assert not [key for key in sums if key[0].endswith("/sandbox") and key[1] == "COIN"]
    assert audit(wallet.database) == []


async def test_repeat_credit_returns_the_original(wallet: Wallet) -> None:
    first = await wallet.credit("fan", 100, stx="apple-1")
    again = await wallet.credit("fan", 100, stx="apple-1")
    assert again.state == pb.CREDIT_STATE_ALREADY_CREDITED
    assert again.transaction_id == first.transaction_id
    assert again.coins_credited == 100
    assert (await wallet.balance("fan")).coins == 100


async def test_concurrent_credits_each_answer_their_own_balance(wallet: Wallet) -> None:
    await wallet.credit("fan", 5)
    # Group commit books these in shared transactions; each answer still shows the
    # balance right after its own credit, as if they had run one after another.
    replies = await asyncio.gather(*(wallet.credit("fan", 10) for _ in range(30)))
    assert sorted(r.balance.coins for r in replies) == list(range(15, 306, 10))
    assert (await wallet.balance("fan")).coins == 305


async def test_longest_store_transaction_id_is_credited(wallet: Wallet) -> None:
    # Play purchase tokens are long; the ledger keeps the whole id as the reference.
    token = "t" * 512
    reply = await wallet.credit("fan", 70, stx=token)
    assert reply.state == pb.CREDIT_STATE_CREDITED
    again = await wallet.credit("fan", 70, stx=token)
    assert again.state == pb.CREDIT_STATE_ALREADY_CREDITED


async def test_receipt_bound_to_other_account(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="apple-2")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await wallet.credit("thief", 100, stx="apple-2")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "RECEIPT_BOUND_TO_OTHER_ACCOUNT"
    assert (await wallet.balance("thief")).coins == 0
    assert (await wallet.balance("fan")).coins == 100


async def test_request_id_replay_and_reuse(wallet: Wallet) -> None:
    request = credit_request("fan", 50, request_id="req-1")
    first = await wallet.stub.CreditPurchase(request, metadata=wallet.md())
    replay = await wallet.stub.CreditPurchase(request, metadata=wallet.md())
    assert replay == first
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await wallet.stub.CreditPurchase(credit_request("fan", 51, request_id="req-1"), metadata=wallet.md())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "REQUEST_ID_REUSED"
    assert (await wallet.balance("fan")).coins == 50


async def gift_diamonds(wallet: Wallet, creator: str, diamonds: int) -> None:
    fan = unique("fan")
    await wallet.credit(fan, diamonds)
    await wallet.gift(fan, creator, "rose", count=diamonds)


async def reserve(
    wallet: Wallet, account: str, diamonds: int, reservation_id: str, **kw: object
) -> pb.ReserveDiamondsResponse:
    return await wallet.stub.ReserveDiamonds(
        pb.ReserveDiamondsRequest(
            request_id=unique("rs"),
            account_id=account,
            diamonds=diamonds,
            reservation_id=reservation_id,
            **kw,  # type: ignore[arg-type]
        ),
        metadata=wallet.md("wallet:reserve"),
    )


async def commit(wallet: Wallet, reservation_id: str, request_id: str | None = None) -> pb.CommitReservationResponse:
    return await wallet.stub.CommitReservation(
        pb.CommitReservationRequest(request_id=request_id or unique("cm"), reservation_id=reservation_id),
        metadata=wallet.md("wallet:reserve"),
    )


async def release(wallet: Wallet, reservation_id: str, request_id: str | None = None) -> pb.ReleaseReservationResponse:
    return await wallet.stub.ReleaseReservation(
        pb.ReleaseReservationRequest(request_id=request_id or unique("rl"), reservation_id=reservation_id),
        metadata=wallet.md("wallet:reserve"),
    )


async def refused(call: object, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    assert error_info(caught.value).reason == reason


async def test_reserve_commit_release(wallet: Wallet) -> None:
    await gift_diamonds(wallet, "creator", 1000)
    held = await reserve(wallet, "creator", 600, "cash-1")
    assert held.reservation.state == pb.RESERVATION_STATE_HELD
    assert (held.balance.diamonds, held.balance.diamonds_reserved, held.balance.diamonds_withdrawable) == (
        1000,
        600,
        400,
    )
    # Reserved diamonds cannot be reserved again.
    await refused(reserve(wallet, "creator", 500, "cash-2"), grpc.StatusCode.FAILED_PRECONDITION, "DIAMONDS_NOT_MATURE")
    await refused(
        reserve(wallet, "creator", 1001, "cash-3"), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_DIAMONDS"
    )
    committed = await commit(wallet, "cash-1", request_id="commit-1")
    assert committed.reservation.state == pb.RESERVATION_STATE_COMMITTED
    balance = await wallet.balance("creator")
    assert (balance.diamonds, balance.diamonds_reserved, balance.diamonds_withdrawable) == (400, 0, 400)
    # Same request id: the original answer; a new one: refused.
    assert await commit(wallet, "cash-1", request_id="commit-1") == committed
    await refused(commit(wallet, "cash-1"), grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_ALREADY_COMMITTED")
    await refused(release(wallet, "cash-1"), grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_ALREADY_COMMITTED")

    await reserve(wallet, "creator", 300, "cash-4")
    released = await release(wallet, "cash-4")
    assert released.reservation.state == pb.RESERVATION_STATE_RELEASED
    await refused(commit(wallet, "cash-4"), grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_ALREADY_RELEASED")
    await refused(release(wallet, "cash-4"), grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_ALREADY_RELEASED")
    await refused(commit(wallet, "nope"), grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
    assert (await wallet.balance("creator")).diamonds_withdrawable == 400
    assert ledger_sums(wallet)[("#sys/payout_clearing", "DIAMOND")] == 600
    assert audit(wallet.database) == []


async def test_reservation_id_is_idempotent(wallet: Wallet) -> None:
    await gift_diamonds(wallet, "creator", 100)
    first = await reserve(wallet, "creator", 60, "cash-1")
    again = await reserve(wallet, "creator", 60, "cash-1")
    assert again.reservation == first.reservation
    assert again.balance.diamonds_reserved == 60
    await refused(
        reserve(wallet, "creator", 61, "cash-1"), grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_ID_REUSED"
    )
    await refused(reserve(wallet, "other", 60, "cash-1"), grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_ID_REUSED")


async def test_concurrent_reservations_never_overcommit(wallet: Wallet) -> None:
    await gift_diamonds(wallet, "creator", 1000)
    results = await asyncio.gather(
        *(reserve(wallet, "creator", 100, f"cash-{i}") for i in range(25)), return_exceptions=True
    )
    held = [r for r in results if isinstance(r, pb.ReserveDiamondsResponse)]
    assert len(held) == 10
    for failure in results:
        if isinstance(failure, grpc.aio.AioRpcError):
            assert error_info(failure).reason == "DIAMONDS_NOT_MATURE"
    assert (await wallet.balance("creator")).diamonds_reserved == 1000
    assert audit(wallet.database) == []


async def test_immature_diamonds_cannot_be_reserved(database_url: str, keys: Keys, tmp_path: Path) -> None:
    async with running_wallet(database_url, keys, tmp_path, holding_days=7) as wallet:
        await gift_diamonds(wallet, "creator", 100)
        balance = await wallet.balance("creator")
        assert (balance.diamonds, balance.diamonds_withdrawable) == (100, 0)
        await refused(
            reserve(wallet, "creator", 1, "cash-1"), grpc.StatusCode.FAILED_PRECONDITION, "DIAMONDS_NOT_MATURE"
        )
        # Age the gift past the holding period: it matures.
        with wallet.database.engine.begin() as conn:
            conn.execute(tables.history.update().values(created_at=datetime.now(UTC) - timedelta(days=8)))
        assert (await wallet.balance("creator")).diamonds_withdrawable == 100
        assert (await reserve(wallet, "creator", 100, "cash-2")).balance.diamonds_reserved == 100


async def test_restricted_account_cannot_reserve(wallet: Wallet) -> None:
    await gift_diamonds(wallet, "creator", 100)
    await wallet.credit("creator", 50, stx="creator-buys")
    await wallet.stub.SpendCoins(
        pb.SpendCoinsRequest(request_id=unique("sp"), account_id="creator", purpose="PROMOTE", coins=50),
        metadata=wallet.md(),
    )
    await wallet.stub.ReversePurchase(
        pb.ReversePurchaseRequest(
            request_id=unique("rv"),
            store=pb.STORE_APP_STORE,
            environment=pb.STORE_ENVIRONMENT_PRODUCTION,
            store_transaction_id="creator-buys",
            full_refund=True,
        ),
        metadata=wallet.md(),
    )
    await refused(reserve(wallet, "creator", 10, "cash-1"), grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_RESTRICTED")


async def test_expired_reservation_returns_diamonds(wallet: Wallet) -> None:
    await gift_diamonds(wallet, "creator", 100)
    soon = Timestamp()
    soon.FromDatetime(datetime.now(UTC) + timedelta(seconds=1))
    held = await reserve(wallet, "creator", 100, "cash-1", expire_time=soon)
    assert held.balance.diamonds_withdrawable == 0
    await asyncio.sleep(1.2)
    assert (await wallet.balance("creator")).diamonds_withdrawable == 100
    await refused(commit(wallet, "cash-1"), grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED")
    assert audit(wallet.database) == []


async def test_commit_after_expiry_is_refused_and_expires(wallet: Wallet) -> None:
    await gift_diamonds(wallet, "creator", 100)
    soon = Timestamp()
    soon.FromDatetime(datetime.now(UTC) + timedelta(seconds=1))
    await reserve(wallet, "creator", 100, "cash-1", expire_time=soon)
    await asyncio.sleep(1.2)
    # Nothing swept it yet: the commit itself notices, expires it and refuses.
    await refused(commit(wallet, "cash-1", "c-1"), grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED")
    await refused(commit(wallet, "cash-1", "c-1"), grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED")
    assert (await wallet.balance("creator")).diamonds_withdrawable == 100
