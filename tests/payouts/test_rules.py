"""Payout rules: exact rates, amounts rounded down, leftover diamonds stay with the creator."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.common.catalog import PayoutRules
from services.payouts.domain.rules import Rules, amount_minor, diamonds_for, requote
from services.payouts.errors import FailedPrecondition, InvalidArgument

RULES = Rules(
    PayoutRules(
        default_currency="USD",
        rates={"USD": Decimal("0.005"), "EUR": Decimal("0.0045"), "JPY": Decimal("0.7")},
        minimum_diamonds=10_000,
        daily_limit_minor={"USD": 100_000},
    )
)


@pytest.mark.parametrize(
    ("diamonds", "currency", "amount", "charged"),
    [
        (10_000, "USD", 5_000, 10_000),  # 200 diamonds = $1
        (10_001, "USD", 5_000, 10_000),  # half a cent is not paid; that diamond stays
        (10_199, "USD", 5_099, 10_198),
        (12_345, "EUR", 5_555, 12_345),  # 55.5525 EUR -> 55.55
        (10_001, "JPY", 7_000, 10_000),  # no minor unit: 7000.7 -> 7000 yen
    ],
)
def test_amount_rounds_down_and_only_the_paid_diamonds_are_charged(
    diamonds: int, currency: str, amount: int, charged: int
) -> None:
    rate = RULES.rate(currency)
    assert amount_minor(diamonds, rate, currency) == amount
    assert diamonds_for(amount, rate, currency) == charged
    assert amount_minor(charged, rate, currency) == amount
    assert amount_minor(charged - 1, rate, currency) < amount


def test_minimum() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        RULES.quote(9_999, "USD")
    assert caught.value.reason == "BELOW_MINIMUM"
    assert RULES.quote(10_000, "USD") == 5_000


def test_unknown_currency_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as caught:
        RULES.currency("currency_code", "GBP")
    assert caught.value.field == "currency_code"
    assert RULES.currency("currency_code", "") == "USD"


@pytest.mark.parametrize(
    ("left", "expected"),
    [
        (20_000, (10_000, 20_000)),
        (11_001, (5_500, 11_000)),  # rounded down at the original rate; the odd diamond stays held
        (10_000, (5_000, 10_000)),
        (9_999, None),  # below the minimum: the cash-out is cancelled (CLAWED_BACK)
    ],
)
def test_a_shrunk_hold_is_requoted_at_the_original_rate_or_cancelled(
    left: int, expected: tuple[int, int] | None
) -> None:
    assert requote(left, Decimal("0.005"), "USD", 10_000) == expected
