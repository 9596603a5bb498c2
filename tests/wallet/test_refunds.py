"""Refunds claw coins back (into debt if spent), purchases pay the debt off, and a
reversed refund restores once."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from services.wallet import store
from tests.support.status import error_info
from tests.wallet.support import Wallet, unique


async def reverse(
    wallet: Wallet, stx: str, quantity: int = 0, milli: int = 0, request_id: str | None = None
) -> pb.ReversePurchaseResponse:
    return await wallet.stub.ReversePurchase(
        pb.ReversePurchaseRequest(
            request_id=request_id or unique("rv"),
            store=pb.STORE_APP_STORE,
            store_transaction_id=stx,
            refunded_quantity=quantity,
            refunded_percentage_milli=milli,
            reason="customer refund",
        ),
        metadata=wallet.md("wallet:credit"),
    )


async def restore(wallet: Wallet, stx: str, request_id: str | None = None) -> pb.RestorePurchaseResponse:
    return await wallet.stub.RestorePurchase(
        pb.RestorePurchaseRequest(
            request_id=request_id or unique("rs"), store=pb.STORE_APP_STORE, store_transaction_id=stx
        ),
        metadata=wallet.md("wallet:credit"),
    )


async def test_refund_after_spending_goes_into_debt_and_is_paid_off(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="buy-1")
    await wallet.gift("fan", "creator", "panda", count=16)  # 80 coins spent
    reversed_ = await reverse(wallet, "buy-1")
    assert reversed_.state == pb.REVERSAL_STATE_APPLIED
    assert (reversed_.coins_reversed, reversed_.account_id) == (100, "fan")
    balance = reversed_.balance
    assert (balance.coins, balance.debt_coins, balance.restricted) == (0, 80, True)
    # Restricted: no gifts, no spending.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await wallet.gift("fan", "creator")
    assert error_info(caught.value).reason == "ACCOUNT_RESTRICTED"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await wallet.stub.SpendCoins(
            pb.SpendCoinsRequest(request_id=unique("sp"), account_id="fan", purpose="PROMOTE", coins=1),
            metadata=wallet.md(),
        )
    assert error_info(caught.value).reason == "ACCOUNT_RESTRICTED"
    # The creator keeps the diamonds: the platform absorbs the refund through the debt.
    assert (await wallet.balance("creator")).diamonds == 80
    # The next purchase pays the debt off first.
    partly = await wallet.credit("fan", 50, stx="buy-2")
    assert (partly.balance.coins, partly.balance.debt_coins, partly.balance.restricted) == (0, 30, True)
    paid = await wallet.credit("fan", 100, stx="buy-3")
    assert (paid.balance.coins, paid.balance.debt_coins, paid.balance.restricted) == (70, 0, False)
    assert (await wallet.gift("fan", "creator")).sender_balance.coins == 69
    assert store.audit(wallet.database) == []


async def test_reversal_is_state_based(wallet: Wallet) -> None:
    await wallet.credit("fan", 300, stx="buy-3x", quantity=3)
    one = await reverse(wallet, "buy-3x", quantity=1)
    assert (one.coins_reversed, one.balance.coins) == (100, 200)
    # The same refund reported again moves nothing.
    again = await reverse(wallet, "buy-3x", quantity=1)
    assert (again.state, again.coins_reversed, again.balance.coins) == (pb.REVERSAL_STATE_ALREADY_APPLIED, 0, 200)
    two = await reverse(wallet, "buy-3x", quantity=2)
    assert (two.coins_reversed, two.balance.coins) == (100, 100)
    everything = await reverse(wallet, "buy-3x")
    assert (everything.coins_reversed, everything.balance.coins) == (100, 0)
    assert store.audit(wallet.database) == []


async def test_prorated_refund_rounds_down_for_the_buyer(wallet: Wallet) -> None:
    await wallet.credit("fan", 99, stx="buy-p")
    half = await reverse(wallet, "buy-p", milli=50_000)
    assert half.coins_reversed == 49  # 49.5 rounds down: the buyer keeps the fraction
    assert (await reverse(wallet, "buy-p", milli=50_000)).coins_reversed == 0
    assert (await reverse(wallet, "buy-p", milli=100_000)).coins_reversed == 50


async def test_concurrent_duplicate_refunds_move_coins_once(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="buy-c")
    results = await asyncio.gather(*(reverse(wallet, "buy-c") for _ in range(10)))
    assert sum(r.coins_reversed for r in results) == 100
    assert (await wallet.balance("fan")).coins == 0


async def test_restore_undoes_reversals_once(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="buy-r")
    await wallet.gift("fan", "creator", "panda", count=10)
    await reverse(wallet, "buy-r", milli=30_000)
    await reverse(wallet, "buy-r")
    assert (await wallet.balance("fan")).debt_coins == 50
    restored = await restore(wallet, "buy-r", request_id="restore-1")
    assert (restored.state, restored.coins_restored) == (pb.REVERSAL_STATE_APPLIED, 100)
    assert (restored.balance.coins, restored.balance.restricted) == (50, False)
    assert await restore(wallet, "buy-r", request_id="restore-1") == restored
    repeat = await restore(wallet, "buy-r")
    assert (repeat.state, repeat.coins_restored, repeat.balance.coins) == (pb.REVERSAL_STATE_ALREADY_APPLIED, 0, 50)
    concurrent = await asyncio.gather(*(restore(wallet, "buy-r") for _ in range(5)))
    assert sum(r.coins_restored for r in concurrent) == 0
    assert store.audit(wallet.database) == []


async def test_unknown_purchase(wallet: Wallet) -> None:
    for call in (reverse(wallet, "never-bought"), restore(wallet, "never-bought")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value).reason == "PURCHASE_NOT_FOUND"
