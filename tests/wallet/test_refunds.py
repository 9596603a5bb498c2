"""Refunds follow the money through a real wallet server, on SQLite and PostgreSQL:
the lot's unspent coins, then the diamonds its coins became (unreserved, held, or owed
by the creator), then the buyer's debt for coins spent on services; a restore
reverses every leg; Sandbox value stays apart; the audit is clean after each."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from services.wallet.audit import audit
from tests.support.status import error_info
from tests.support.tokens import Keys
from tests.wallet.support import Wallet, running_wallet, unique

PRODUCTION, SANDBOX = pb.STORE_ENVIRONMENT_PRODUCTION, pb.STORE_ENVIRONMENT_SANDBOX


async def reverse(
    wallet: Wallet,
    stx: str,
    quantity: int = 0,
    milli: int = 0,
    request_id: str | None = None,
    environment: int = PRODUCTION,
) -> pb.ReversePurchaseResponse:
    return await wallet.stub.ReversePurchase(
        pb.ReversePurchaseRequest(
            request_id=request_id or unique("rv"),
            store=pb.STORE_APP_STORE,
            environment=environment,  # type: ignore[arg-type]
            store_transaction_id=stx,
            refunded_quantity=quantity,
            refunded_percentage_milli=milli,
            full_refund=not (quantity or milli),
            reason="customer refund",
        ),
        metadata=wallet.md("wallet:credit"),
    )


async def restore(
    wallet: Wallet, stx: str, request_id: str | None = None, environment: int = PRODUCTION
) -> pb.RestorePurchaseResponse:
    return await wallet.stub.RestorePurchase(
        pb.RestorePurchaseRequest(
            request_id=request_id or unique("rs"),
            store=pb.STORE_APP_STORE,
            environment=environment,  # type: ignore[arg-type]
            store_transaction_id=stx,
        ),
        metadata=wallet.md("wallet:credit"),
    )


async def consumption(wallet: Wallet, stx: str, environment: int = PRODUCTION) -> pb.GetPurchaseConsumptionResponse:
    return await wallet.stub.GetPurchaseConsumption(
        pb.GetPurchaseConsumptionRequest(
            store=pb.STORE_APP_STORE,
            environment=environment,  # type: ignore[arg-type]
            store_transaction_id=stx,
        ),
        metadata=wallet.md("wallet:read"),
    )


async def spend(wallet: Wallet, account: str, coins: int) -> pb.SpendCoinsResponse:
    return await wallet.stub.SpendCoins(
        pb.SpendCoinsRequest(request_id=unique("sp"), account_id=account, purpose="PROMOTE", coins=coins),
        metadata=wallet.md(),
    )


async def reserve(wallet: Wallet, account: str, diamonds: int, reservation_id: str) -> pb.ReserveDiamondsResponse:
    return await wallet.stub.ReserveDiamonds(
        pb.ReserveDiamondsRequest(
            request_id=unique("rsv"), account_id=account, diamonds=diamonds, reservation_id=reservation_id
        ),
        metadata=wallet.md(),
    )


async def commit(wallet: Wallet, reservation_id: str) -> pb.CommitReservationResponse:
    return await wallet.stub.CommitReservation(
        pb.CommitReservationRequest(request_id=unique("cm"), reservation_id=reservation_id), metadata=wallet.md()
    )


async def refused(call: object, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert error_info(caught.value).reason == reason, caught.value.details()


def legs(reply: pb.ReversePurchaseResponse | pb.RestorePurchaseResponse) -> list[tuple[int, int, str, int, int, int]]:
    return [
        (leg.kind, leg.coins, leg.creator_account_id, leg.diamonds, leg.diamonds_from_holds, leg.diamond_debt)
        for leg in reply.legs
    ]


async def test_refund_takes_unspent_coins_then_the_creators_diamonds(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="buy-1")
    await wallet.gift("fan", "star", "panda", count=16)  # 80 coins -> 80 diamonds
    reply = await reverse(wallet, "buy-1")
    assert (reply.state, reply.coins_reversed, reply.account_id) == (pb.REVERSAL_STATE_APPLIED, 100, "fan")
    assert legs(reply) == [
        (pb.ClawbackLeg.KIND_UNSPENT, 20, "", 0, 0, 0),
        (pb.ClawbackLeg.KIND_GIFT, 80, "star", 80, 0, 0),
    ]
    # The buyer owes nothing (the money came back from the creator), and the creator keeps nothing.
    assert (reply.balance.coins, reply.balance.debt_coins, reply.balance.restricted) == (0, 0, False)
    star = await wallet.balance("star")
    assert (star.diamonds, star.diamond_debt) == (0, 0)
    history = await wallet.stub.ListTransactions(
        pb.ListTransactionsRequest(account_id="star", kinds=[pb.TRANSACTION_KIND_GIFT_REVERSAL]), metadata=wallet.md()
    )
    assert [(t.diamonds_delta, t.counterparty_account_id) for t in history.transactions] == [(-80, "fan")]
    assert audit(wallet.database) == []


async def test_refund_shrinks_a_hold_then_restore_gives_everything_back(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="buy-h")
    await wallet.gift("fan", "star", "panda", count=20)  # 100 diamonds
    await wallet.credit("other", 50, stx="buy-o")
    await wallet.gift("other", "star", "panda", count=10)  # 50 diamonds from someone else
    held = await reserve(wallet, "star", 120, "cash-1")
    assert (held.balance.diamonds, held.balance.diamonds_reserved) == (150, 120)
    reply = await reverse(wallet, "buy-h")
    # 30 unreserved diamonds first, then 70 from the hold.
    assert legs(reply) == [(pb.ClawbackLeg.KIND_GIFT, 100, "star", 100, 70, 0)]
    star = await wallet.balance("star")
    assert (star.diamonds, star.diamonds_reserved, star.diamond_debt) == (50, 50, 0)
    hold = await commit(wallet, "cash-1")
    assert (hold.reservation.diamonds, hold.reservation.diamonds_clawed_back) == (50, 70)
    assert audit(wallet.database) == []
    # The store reverses the refund: the creator gets all 100 diamonds back (their hold was paid out meanwhile).
    restored = await restore(wallet, "buy-h")
    assert (restored.state, restored.coins_restored) == (pb.REVERSAL_STATE_APPLIED, 100)
    assert (await wallet.balance("star")).diamonds == 100
    assert (await consumption(wallet, "buy-h")).clawed_back_coins == 0
    assert audit(wallet.database) == []


async def test_cashed_out_diamonds_become_creator_debt_netted_against_the_next_gift(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="buy-d")
    await wallet.gift("fan", "star", "panda", count=20)
    await reserve(wallet, "star", 100, "cash-d")
    await commit(wallet, "cash-d")  # paid out: nothing left to take
    reply = await reverse(wallet, "buy-d")
    assert legs(reply) == [(pb.ClawbackLeg.KIND_GIFT, 100, "star", 100, 0, 100)]
    star = await wallet.balance("star")
    assert (star.diamonds, star.diamond_debt, star.diamonds_withdrawable) == (0, 100, 0)
    await wallet.credit("fan2", 200, stx="buy-e")
    await wallet.gift("fan2", "star", "panda", count=30)  # 150 diamonds: 100 repay the debt
    star = await wallet.balance("star")
    assert (star.diamonds, star.diamond_debt, star.diamonds_withdrawable) == (50, 0, 50)
    await refused(reserve(wallet, "star", 60, "cash-e"), "INSUFFICIENT_DIAMONDS")
    assert audit(wallet.database) == []
    # While the debt is open nothing can be reserved.
    await reverse(wallet, "buy-e")
    assert (await wallet.balance("star")).diamond_debt == 100
    await refused(reserve(wallet, "star", 1, "cash-f"), "DIAMOND_DEBT")
    # Restores reverse each case exactly.
    await restore(wallet, "buy-e")
    await restore(wallet, "buy-d")
    star = await wallet.balance("star")
    assert (star.diamonds, star.diamond_debt) == (150, 0)
    assert audit(wallet.database) == []


async def test_one_gift_paid_by_two_purchases_loses_exactly_the_refunded_share(wallet: Wallet) -> None:
    await wallet.credit("fan", 30, stx="lot-a")
    await wallet.credit("fan", 30, stx="lot-b")
    reply = await wallet.gift("fan", "star", "panda", count=10)  # 50 coins: 30 from lot-a, 20 from lot-b
    assert (reply.coins_spent, reply.diamonds_to_creator, reply.sender_balance.coins) == (50, 50, 10)
    a, b = await consumption(wallet, "lot-a"), await consumption(wallet, "lot-b")
    assert (a.gift_coins, a.unspent_coins, a.consumed_percentage_milli) == (30, 0, 100_000)
    assert (b.gift_coins, b.unspent_coins, b.consumed_percentage_milli) == (20, 10, 66_666)
    assert [(c.creator_account_id, c.coins, c.diamonds) for c in b.creators] == [("star", 20, 20)]
    refund = await reverse(wallet, "lot-b")
    assert legs(refund) == [
        (pb.ClawbackLeg.KIND_UNSPENT, 10, "", 0, 0, 0),
        (pb.ClawbackLeg.KIND_GIFT, 20, "star", 20, 0, 0),
    ]
    assert (await wallet.balance("star")).diamonds == 30
    assert (await wallet.balance("fan")).coins == 0
    assert audit(wallet.database) == []


async def test_a_gift_straddling_two_lots_still_gives_the_catalogs_diamonds(
    database_url: str, keys: Keys, tmp_path: Path
) -> None:
    async with running_wallet(database_url, keys, tmp_path, per_coin="1/2") as wallet:
        await wallet.credit("fan", 2, stx="tiny-1")
        await wallet.credit("fan", 1, stx="tiny-2", environment=SANDBOX)
        # The "odd" gift costs 3 coins: 1 diamond at 1/2 per coin, rounded down per gift.
        reply = await wallet.gift("fan", "star", "odd")
        assert (reply.coins_spent, reply.sandbox_coins_spent) == (2, 1)
        # The creator receives the catalog's 1 diamond; the real part (2/3) rounds down, the Sandbox part rounds.
        assert (reply.diamonds_to_creator, reply.sandbox_diamonds_to_creator) == (0, 1)
        star = await wallet.balance("star")
        assert (star.diamonds, star.sandbox_diamonds) == (0, 1)
        await wallet.credit("fan", 3, stx="tiny-3")
        assert (await wallet.gift("fan", "star", "odd")).diamonds_to_creator == 1
        assert audit(wallet.database) == []


async def test_repeated_partial_refunds_claw_exactly_the_whole_purchase(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="buy-3x", quantity=3)
    await wallet.gift("fan", "star", "panda", count=10)  # 50 coins spent, 50 unspent
    one = await reverse(wallet, "buy-3x", quantity=1)  # 33 coins: all from the unspent ones
    assert (one.coins_reversed, one.balance.coins) == (33, 17)
    again = await reverse(wallet, "buy-3x", quantity=1)
    assert (again.state, again.coins_reversed) == (pb.REVERSAL_STATE_ALREADY_APPLIED, 0)
    two = await reverse(wallet, "buy-3x", quantity=2)  # 66 in all: 17 unspent, then 16 of the gift
    assert (two.coins_reversed, two.balance.coins) == (33, 0)
    assert legs(two)[1][:4] == (pb.ClawbackLeg.KIND_GIFT, 16, "star", 16)
    everything = await reverse(wallet, "buy-3x")
    assert everything.coins_reversed == 34
    assert (await consumption(wallet, "buy-3x")).clawed_back_coins == 100
    assert (await wallet.balance("star")).diamonds == 0  # every diamond of the purchase, exactly
    assert audit(wallet.database) == []


async def test_coins_spent_on_services_become_debt_that_the_next_purchase_repays(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="buy-s")
    await spend(wallet, "fan", 80)
    reply = await reverse(wallet, "buy-s")
    assert legs(reply) == [(pb.ClawbackLeg.KIND_UNSPENT, 20, "", 0, 0, 0), (pb.ClawbackLeg.KIND_DEBT, 80, "", 0, 0, 0)]
    assert (reply.balance.coins, reply.balance.debt_coins, reply.balance.restricted) == (0, 80, True)
    await refused(wallet.gift("fan", "star"), "ACCOUNT_RESTRICTED")
    await refused(spend(wallet, "fan", 1), "ACCOUNT_RESTRICTED")
    partly = await wallet.credit("fan", 50, stx="buy-t")
    assert (partly.balance.coins, partly.balance.debt_coins, partly.balance.restricted) == (0, 30, True)
    assert (await consumption(wallet, "buy-t")).debt_repayment_coins == 50
    paid = await wallet.credit("fan", 100, stx="buy-u")
    assert (paid.balance.coins, paid.balance.debt_coins) == (70, 0)
    assert audit(wallet.database) == []
    # The refund is reversed: the debt it made is gone, and the repayments come back as coins.
    back = await restore(wallet, "buy-s")
    assert (back.balance.coins, back.balance.debt_coins) == (20 + 50 + 100, 0)  # 250 bought, 80 spent
    assert (await consumption(wallet, "buy-t")).unspent_coins == 50
    assert audit(wallet.database) == []


async def test_a_debt_is_repaid_at_once_by_other_open_purchases(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="first")
    await spend(wallet, "fan", 100)
    await wallet.credit("fan", 100, stx="second")
    reply = await reverse(wallet, "first")
    assert (reply.balance.coins, reply.balance.debt_coins) == (0, 0)
    assert (await consumption(wallet, "second")).debt_repayment_coins == 100
    # Refunding the second too leaves the debt of the promotion both paid for.
    assert (await reverse(wallet, "second")).balance.debt_coins == 100
    assert audit(wallet.database) == []


async def test_a_partial_refund_that_computes_to_nothing_moves_nothing(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="buy-z", quantity=3)
    reply = await reverse(wallet, "buy-z", milli=5)  # 0.005 % of 100 coins rounds down to 0
    assert (reply.state, reply.coins_reversed, reply.balance.coins) == (pb.REVERSAL_STATE_NOTHING_REFUNDED, 0, 100)


async def test_the_environment_is_part_of_the_purchase_key(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="same-id")
    await wallet.credit("tester", 7, stx="same-id", environment=SANDBOX)
    reply = await reverse(wallet, "same-id", environment=SANDBOX)
    assert (reply.account_id, reply.coins_reversed) == ("tester", 7)
    assert (await wallet.balance("fan")).coins == 100
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reverse(wallet, "never-bought", environment=SANDBOX)
    assert error_info(caught.value).reason == "PURCHASE_NOT_FOUND"
    assert audit(wallet.database) == []


async def test_sandbox_value_can_be_spent_but_never_cashed_out(wallet: Wallet) -> None:
    sandbox = await wallet.credit("tester", 500, stx="sbx-1", environment=SANDBOX)
    assert (sandbox.balance.coins, sandbox.balance.sandbox_coins) == (0, 500)
    sent = await wallet.gift("tester", "star", "panda", count=100)  # testers must be able to test gifts
    assert (sent.coins_spent, sent.sandbox_coins_spent, sent.sandbox_diamonds_to_creator) == (0, 500, 500)
    star = await wallet.balance("star")
    assert (star.diamonds, star.diamonds_withdrawable, star.sandbox_diamonds) == (0, 0, 500)
    await refused(reserve(wallet, "star", 100, "cash-sbx"), "SANDBOX_NOT_WITHDRAWABLE")
    history = await wallet.stub.ListTransactions(pb.ListTransactionsRequest(account_id="tester"), metadata=wallet.md())
    assert [(t.kind, t.coins_delta, t.sandbox_coins_delta) for t in history.transactions] == [
        (pb.TRANSACTION_KIND_GIFT_SENT, 0, -500),
        (pb.TRANSACTION_KIND_PURCHASE, 0, 500),
    ]
    # A Sandbox refund never touches real value, and real debt is never repaid by Sandbox coins.
    await wallet.credit("tester", 10, stx="real-1")
    await spend(wallet, "tester", 10)
    await reverse(wallet, "real-1")
    await wallet.credit("tester", 50, stx="sbx-2", environment=SANDBOX)
    balance = await wallet.balance("tester")
    assert (balance.debt_coins, balance.sandbox_coins, balance.restricted) == (10, 50, True)
    assert audit(wallet.database) == []


async def test_restore_undoes_reversals_once(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="buy-r")
    await spend(wallet, "fan", 50)
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
    # A later refund is a new refund.
    assert (await reverse(wallet, "buy-r")).coins_reversed == 100
    assert audit(wallet.database) == []


async def test_concurrent_duplicate_refunds_move_coins_once(wallet: Wallet) -> None:
    await wallet.credit("fan", 100, stx="buy-c")
    await wallet.gift("fan", "star", "panda", count=4)
    results = await asyncio.gather(*(reverse(wallet, "buy-c") for _ in range(10)))
    assert sum(r.coins_reversed for r in results) == 100
    assert ((await wallet.balance("fan")).coins, (await wallet.balance("star")).diamonds) == (0, 0)
    assert audit(wallet.database) == []


async def test_unknown_purchase(wallet: Wallet) -> None:
    for call in (reverse(wallet, "never-bought"), restore(wallet, "never-bought"), consumption(wallet, "never-bought")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value).reason == "PURCHASE_NOT_FOUND"
