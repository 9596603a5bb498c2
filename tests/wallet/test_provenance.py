"""Coin provenance rules, without a database: which lots pay, how diamonds are
attributed, how a refund is clawed back, which repayments a restore undoes."""

from __future__ import annotations

import pytest

from services.wallet.domain.ledger import Currency, Environment, balanced
from services.wallet.domain.postings import clawback, gift
from services.wallet.domain.provenance import (
    Consumption,
    ConsumptionKind,
    CreatorDiamonds,
    Hold,
    LegKind,
    OpenLot,
    Take,
    attribute,
    plan_clawback,
    restore_repayments,
    take_coins,
)

REAL, SANDBOX = Environment.PRODUCTION, Environment.SANDBOX


def test_coins_are_taken_oldest_credited_first() -> None:
    lots = [OpenLot(9, REAL, 5), OpenLot(2, SANDBOX, 3), OpenLot(4, REAL, 10)]
    assert take_coins(lots, 7) == [Take(2, SANDBOX, 3), Take(4, REAL, 4)]
    assert take_coins(lots, 18) == [Take(2, SANDBOX, 3), Take(4, REAL, 10), Take(9, REAL, 5)]
    with pytest.raises(ValueError, match="18 coins"):
        take_coins(lots, 19)


def test_attribution_by_largest_remainder_sums_exactly() -> None:
    takes = [Take(1, REAL, 1), Take(2, REAL, 1), Take(3, REAL, 1)]
    assert attribute(2, takes) == [1, 1, 0]  # ties go to the older lot
    assert attribute(10, [Take(1, REAL, 3), Take(2, REAL, 7)]) == [3, 7]
    assert attribute(5, [Take(1, REAL, 2), Take(2, REAL, 1)]) == [3, 2]  # 3.33 / 1.67: the larger remainder
    assert attribute(0, takes) == [0, 0, 0]
    assert sum(attribute(997, [Take(i, REAL, i * 7 + 1) for i in range(1, 30)])) == 997


def test_sandbox_parts_take_the_rounding() -> None:
    # A 3-coin gift at 1/2 diamond per coin is worth 1 diamond.
    assert attribute(1, [Take(1, REAL, 2), Take(2, SANDBOX, 1)]) == [0, 1]  # real 0.67 is rounded down
    assert attribute(1, [Take(1, SANDBOX, 2), Take(2, REAL, 1)]) == [1, 0]
    # Several real parts with large remainders: all the leftover goes to the one Sandbox part.
    assert attribute(10, [Take(1, REAL, 3), Take(2, REAL, 3), Take(3, REAL, 3), Take(4, SANDBOX, 1)]) == [3, 3, 3, 1]
    assert attribute(3, [Take(1, REAL, 3), Take(2, REAL, 3), Take(3, REAL, 3), Take(4, SANDBOX, 1)]) == [0, 0, 0, 3]


def test_a_gift_split_over_both_pairs_balances_each() -> None:
    takes = [Take(1, REAL, 2), Take(2, SANDBOX, 1)]
    postings = balanced(gift("fan", "star", takes, attribute(1, takes)))
    assert {(p.account_id, p.currency): p.amount for p in postings if p.account_id in ("fan", "star")} == {
        ("fan", Currency.COIN): -2,
        ("fan", Currency.SANDBOX_COIN): -1,
        ("star", Currency.SANDBOX_DIAMOND): 1,
    }


def gift_of(
    consumption_id: int, coins: int, diamonds: int, creator: str = "star", clawed_coins: int = 0
) -> Consumption:
    return Consumption(consumption_id, ConsumptionKind.GIFT, coins, clawed_coins, creator, diamonds, 0)


def test_clawback_takes_unspent_then_newest_consumption_first() -> None:
    used = [gift_of(1, 30, 15, "old"), gift_of(2, 40, 20, "new"), Consumption(3, ConsumptionKind.SPEND, 10, 0)]
    creators = {"old": CreatorDiamonds(100), "new": CreatorDiamonds(100)}
    plan = plan_clawback(55, unspent=20, consumptions=used, creators=creators)
    assert [(leg.kind, leg.coins, leg.consumption_id) for leg in plan.legs] == [
        (LegKind.UNSPENT, 20, None),
        (LegKind.DEBT, 10, 3),
        (LegKind.GIFT, 25, 2),
    ]
    # 25 of the gift's 40 coins: 20 × 25/40 = 12.5 diamonds, rounded down in the creator's favour.
    assert plan.legs[2].diamonds == 12
    assert plan.creators["new"].balance == 88
    balanced(clawback("fan", REAL, plan.legs))


def test_gift_diamonds_are_exact_once_all_its_coins_are_clawed() -> None:
    first = plan_clawback(1, 0, [gift_of(1, 3, 1)], {"star": CreatorDiamonds(10)})
    assert first.legs[0].diamonds == 0  # 1 × 1/3
    rest = plan_clawback(2, 0, [gift_of(1, 3, 1, clawed_coins=1)], {"star": CreatorDiamonds(10)})
    assert rest.legs[0].diamonds == 1


def test_diamonds_come_from_balance_then_newest_hold_then_debt() -> None:
    state = CreatorDiamonds(balance=5, holds=(Hold("cash-new", 4), Hold("cash-old", 10)))
    plan = plan_clawback(30, 0, [gift_of(1, 30, 30)], {"star": state})
    (leg,) = plan.legs
    assert (leg.diamonds, leg.from_balance, leg.from_holds, leg.debt) == (
        30,
        5,
        (("cash-new", 4), ("cash-old", 10)),
        11,
    )
    assert plan.creators["star"] == CreatorDiamonds(-11, (Hold("cash-new", 0), Hold("cash-old", 0)))
    postings = balanced(clawback("fan", REAL, plan.legs))
    assert {(p.account_id, p.currency): p.amount for p in postings if not p.account_id.startswith("#sys")} == {
        ("star", Currency.DIAMOND): -16,
        ("#hold/star", Currency.DIAMOND): -14,
    }
    restored = balanced(clawback("fan", REAL, plan.legs, restore=True))
    assert {(p.account_id, p.currency): p.amount for p in restored if not p.account_id.startswith("#sys")} == {
        ("star", Currency.DIAMOND): 30
    }


def test_a_creator_already_in_debt_gives_nothing_from_the_balance() -> None:
    plan = plan_clawback(4, 0, [gift_of(1, 4, 4)], {"star": CreatorDiamonds(-3)})
    assert (plan.legs[0].from_balance, plan.legs[0].debt) == (0, 4)
    assert plan.creators["star"].balance == -7


def test_a_clawback_never_exceeds_what_the_lot_can_cover() -> None:
    with pytest.raises(ValueError, match="unaccounted"):
        plan_clawback(11, 5, [gift_of(1, 5, 5)], {"star": CreatorDiamonds(10)})


def test_restore_undoes_newest_repayments_first() -> None:
    assert restore_repayments(7, [(1, 5), (4, 3), (2, 10)]) == [(4, 3), (2, 4)]
    with pytest.raises(ValueError, match="no debt"):
        restore_repayments(20, [(1, 5)])
