"""Pure rules of the wallet, without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.wallet.domain import postings
from services.wallet.domain.holds import CommitPlan, debt_repaid, plan_commit
from services.wallet.domain.ledger import PAYOUT_CLEARING, Currency, Posting, UnbalancedTransaction, balanced
from services.wallet.domain.provenance import Hold, clawback_target
from services.wallet.domain.rules import LimitState, Period, change_limit, period_start

NOW = datetime(2026, 11, 26, 15, 30, tzinfo=UTC)  # a Thursday


def test_balanced_refuses_entries_that_do_not_sum_to_zero() -> None:
    ok = balanced([Posting("a", Currency.COIN, 5), Posting("b", Currency.COIN, -5), Posting("c", Currency.DIAMOND, 0)])
    assert len(ok) == 2
    with pytest.raises(UnbalancedTransaction):
        balanced([Posting("a", Currency.COIN, 5), Posting("b", Currency.DIAMOND, -5)])


@pytest.mark.parametrize(
    ("coins", "quantity", "refunded", "milli", "expected"),
    [
        (300, 3, 1, 0, 100),
        (100, 3, 1, 0, 33),  # 33.3 rounds down, for the buyer
        (100, 3, 2, 0, 66),
        (100, 3, 5, 0, 100),  # more than bought: all
        (99, 1, 0, 50_000, 49),
        (99, 1, 0, 100_000, 99),
        (99, 1, 0, 250_000, 99),
    ],
)
def test_clawback_target(coins: int, quantity: int, refunded: int, milli: int, expected: int) -> None:
    assert clawback_target(coins, quantity, refunded, milli, full=False) == expected
    assert clawback_target(coins, quantity, 0, 0, full=True) == coins


def test_period_starts_are_utc_calendar_periods() -> None:
    assert period_start(Period.DAILY, NOW) == datetime(2026, 11, 26, tzinfo=UTC)
    assert period_start(Period.WEEKLY, NOW) == datetime(2026, 11, 23, tzinfo=UTC)
    assert period_start(Period.MONTHLY, NOW) == datetime(2026, 11, 1, tzinfo=UTC)


def test_limit_changes() -> None:
    none = LimitState(0, None, None)
    first, now_effective, _ = change_limit(none, 100, NOW)
    assert (first.limit_coins, now_effective) == (100, True)
    raised, now_effective, when = change_limit(first, 200, NOW)
    assert (raised.limit_coins, raised.pending_limit_coins, now_effective) == (100, 200, False)
    assert when == NOW + timedelta(hours=24)
    assert raised.effective(when - timedelta(seconds=1)).limit_coins == 100
    assert raised.effective(when).limit_coins == 200
    removed, now_effective, _ = change_limit(first, 0, NOW)
    assert (removed.limit_coins, removed.pending_limit_coins, now_effective) == (100, 0, False)
    lowered, now_effective, _ = change_limit(raised, 50, NOW)
    assert (lowered.limit_coins, lowered.pending_limit_coins, now_effective) == (50, None, True)


@pytest.mark.parametrize(
    ("paid", "held", "balance", "others", "expected"),
    [
        # The hold pays; its excess goes back to the creator.
        (100, 150, 0, [], CommitPlan(100, 50, 0, (), 0)),
        # A lapsed hold: unreserved diamonds first, then unsubmitted holds newest first, then debt.
        (400, 0, 60, [Hold("new", 200), Hold("old", 100)], CommitPlan(0, 0, 60, (("new", 200), ("old", 100)), 40)),
        # A row already in debt gives nothing; a shrunk hold pays what is left of it.
        (300, 100, -20, [], CommitPlan(100, 0, 0, (), 200)),
    ],
)
def test_a_paid_commit_takes_its_shortfall_in_order(
    paid: int, held: int, balance: int, others: list[Hold], expected: CommitPlan
) -> None:
    plan = plan_commit(paid, held, balance, others)
    assert plan == expected
    assert plan.paid == paid
    assert sum(p.amount for p in postings.commit("c", plan) if p.account_id == PAYOUT_CLEARING) == paid


def test_released_diamonds_repay_debt_first() -> None:
    assert debt_repaid(100, -30) == 30
    assert debt_repaid(100, -300) == 100
    assert debt_repaid(100, 5) == 0
