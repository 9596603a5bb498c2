"""Payout rules from the catalog: rates, rounding, minimum and daily limit."""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal

from services.common.catalog import CURRENCY_EXPONENTS, PayoutRules
from services.payouts.errors import FailedPrecondition, InvalidArgument


def amount_minor(diamonds: int, rate: Decimal, currency: str) -> int:
    """Cash for ``diamonds`` at ``rate`` per diamond, in minor units, rounded down."""
    exponent = CURRENCY_EXPONENTS[currency]
    exact = Decimal(diamonds) * rate * (Decimal(10) ** exponent)
    return int(exact.to_integral_value(rounding=ROUND_FLOOR))


def diamonds_for(amount: int, rate: Decimal, currency: str) -> int:
    """Fewest diamonds whose value rounds down to exactly ``amount`` minor units (others stay with the creator)."""
    exponent = CURRENCY_EXPONENTS[currency]
    per_diamond = rate * (Decimal(10) ** exponent)
    needed = (Decimal(amount) / per_diamond).to_integral_value(rounding="ROUND_CEILING")
    return int(needed)


def requote(left: int, rate: Decimal, currency: str, minimum: int) -> tuple[int, int] | None:
    """A cash-out whose hold a clawback shrank to ``left`` diamonds, at its original rate:
    (amount rounded down, diamonds it charges), or None when the rest is below the minimum."""
    if left < minimum:
        return None
    amount = amount_minor(left, rate, currency)
    if amount <= 0:
        return None
    return amount, diamonds_for(amount, rate, currency)


class Rules:
    def __init__(self, rules: PayoutRules) -> None:
        self._rules = rules

    @property
    def default_currency(self) -> str:
        return self._rules.default_currency

    @property
    def minimum_diamonds(self) -> int:
        return self._rules.minimum_diamonds

    def currency(self, field: str, requested: str) -> str:
        currency = requested or self._rules.default_currency
        if currency not in self._rules.rates:
            raise InvalidArgument(
                field, f"no payout rate for {currency}; payable in {', '.join(sorted(self._rules.rates))}"
            )
        return currency

    def rate(self, currency: str) -> Decimal:
        return self._rules.rates[currency]

    def daily_limit(self, currency: str) -> int | None:
        return self._rules.daily_limit_minor.get(currency)

    def quote(self, diamonds: int, currency: str) -> int:
        """The amount for a cash-out of ``diamonds``, refusing one below the minimum."""
        if diamonds < self._rules.minimum_diamonds:
            raise FailedPrecondition(
                "BELOW_MINIMUM",
                f"a cash-out needs at least {self._rules.minimum_diamonds} diamonds",
                {"minimum_diamonds": str(self._rules.minimum_diamonds)},
            )
        amount = amount_minor(diamonds, self.rate(currency), currency)
        if amount <= 0:
            raise FailedPrecondition("BELOW_MINIMUM", "the diamonds are worth less than one minor unit")
        return amount


def daily_limit_error(limit: int, currency: str) -> FailedPrecondition:
    return FailedPrecondition(
        "DAILY_LIMIT_EXCEEDED",
        f"the cash-out would pass the daily limit of {limit} {currency} minor units",
        {"daily_limit_minor": str(limit), "currency_code": currency},
    )
