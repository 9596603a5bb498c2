"""The ledger model: accounts, currencies, transaction kinds and balanced postings.

Pure logic, no SQL. Every ledger transaction is a list of :class:`Posting`
whose amounts sum to zero per currency; :func:`balanced` builds and checks one.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


class Currency(enum.Enum):
    """Real value and Sandbox value are separate currencies, so the per-currency
    balance of every transaction keeps them apart by construction."""

    COIN = "COIN"
    DIAMOND = "DIAMOND"
    SANDBOX_COIN = "SANDBOX_COIN"
    SANDBOX_DIAMOND = "SANDBOX_DIAMOND"

    # Members are singletons compared by identity, so the identity hash agrees with
    # equality; Enum's own __hash__ is a Python function, and a gift batch hashes a
    # currency some thirty times per gift (balances, deltas and history keyed by it).
    __hash__ = object.__hash__


class Store(enum.Enum):
    APP_STORE = "APP_STORE"
    GOOGLE_PLAY = "GOOGLE_PLAY"


class Environment(enum.Enum):
    PRODUCTION = "PRODUCTION"
    SANDBOX = "SANDBOX"


def coin_currency(environment: Environment) -> Currency:
    return Currency.SANDBOX_COIN if environment is Environment.SANDBOX else Currency.COIN


def diamond_currency(environment: Environment) -> Currency:
    return Currency.SANDBOX_DIAMOND if environment is Environment.SANDBOX else Currency.DIAMOND


COIN_CURRENCIES = (Currency.COIN, Currency.SANDBOX_COIN)


class Kind(enum.Enum):
    """A transaction's kind as seen from one user account (history filter)."""

    PURCHASE = "PURCHASE"
    PURCHASE_REVERSAL = "PURCHASE_REVERSAL"
    PURCHASE_RESTORE = "PURCHASE_RESTORE"
    GIFT_SENT = "GIFT_SENT"
    GIFT_RECEIVED = "GIFT_RECEIVED"
    GIFT_REVERSAL = "GIFT_REVERSAL"  # a creator's diamonds taken back by a refund of the coins that paid
    GIFT_RESTORE = "GIFT_RESTORE"  # ... and given back when the store reversed that refund
    SPEND = "SPEND"
    RESERVATION = "RESERVATION"
    RESERVATION_COMMIT = "RESERVATION_COMMIT"
    RESERVATION_RELEASE = "RESERVATION_RELEASE"


# Internal account ids start with '#', which the request validation never lets
# through in an account id, so a user can never name (or spend from) one.
SYSTEM_PREFIX = "#sys/"
HOLD_PREFIX = "#hold/"

GIFT_REVENUE = SYSTEM_PREFIX + "gift_revenue"
SPEND_REVENUE = SYSTEM_PREFIX + "spend_revenue"
PAYOUT_CLEARING = SYSTEM_PREFIX + "payout_clearing"
CLAWBACK = SYSTEM_PREFIX + "clawback"


def purchase_clearing(store: Store, environment: Environment) -> str:
    """Where a store's coins come from; sandbox purchases have their own clearing account."""
    suffix = "/sandbox" if environment is Environment.SANDBOX else ""
    return f"{SYSTEM_PREFIX}purchase_clearing/{store.value.lower()}{suffix}"


def promotions_expense(environment: Environment) -> str:
    suffix = "/sandbox" if environment is Environment.SANDBOX else ""
    return f"{SYSTEM_PREFIX}promotions_expense{suffix}"


def hold_account(account_id: str) -> str:
    """The sub-account holding an account's reserved diamonds (still the creator's)."""
    return HOLD_PREFIX + account_id


def is_system(account_id: str) -> bool:
    return account_id.startswith(SYSTEM_PREFIX)


def clawback_account(environment: Environment) -> str:
    return CLAWBACK + ("/sandbox" if environment is Environment.SANDBOX else "")


def diamond_lock_order(account_id: str) -> tuple[bool, str]:
    """Diamond rows are locked creators first, then holds (each sorted)."""
    return (account_id.startswith(HOLD_PREFIX), account_id)


@dataclass(frozen=True, slots=True)
class Posting:
    account_id: str
    currency: Currency
    amount: int


class UnbalancedTransaction(AssertionError):
    """A bug: a transaction whose entries do not sum to zero per currency."""


def balanced(postings: Iterable[Posting]) -> list[Posting]:
    """The postings without zero amounts, after checking they sum to zero per currency."""
    result = [p for p in postings if p.amount != 0]
    totals: dict[Currency, int] = defaultdict(int)
    for posting in result:
        totals[posting.currency] += posting.amount
    if any(totals.values()):
        raise UnbalancedTransaction(f"entries do not sum to zero: {dict(totals)}")
    return result


@dataclass(frozen=True)
class BalanceView:
    """An account's balances as the API shows them: real value, and Sandbox value apart."""

    account_id: str
    coin_balance: int  # negative while in debt
    diamonds: int  # the unreserved diamonds row; negative is diamond debt from clawed-back gifts
    diamonds_reserved: int
    # Received within the holding period; read only while ``diamonds`` > 0 (it only lowers
    # what is withdrawable, which is 0 without unreserved diamonds).
    diamonds_immature: int
    sandbox_coin_balance: int = 0
    sandbox_diamonds: int = 0

    @property
    def coins(self) -> int:
        return max(self.coin_balance, 0)

    @property
    def debt_coins(self) -> int:
        return max(-self.coin_balance, 0)

    @property
    def restricted(self) -> bool:
        return self.coin_balance < 0

    @property
    def diamond_debt(self) -> int:
        return max(-self.diamonds, 0)

    @property
    def diamonds_total(self) -> int:
        return max(self.diamonds, 0) + self.diamonds_reserved

    @property
    def diamonds_withdrawable(self) -> int:
        # Diamonds leave the account only through reservations, which take
        # matured diamonds only, so what is left unmatured is the recent receipts.
        return max(self.diamonds - self.diamonds_immature, 0)

    @property
    def sandbox_coins(self) -> int:
        return max(self.sandbox_coin_balance, 0)

    @property
    def sandbox_debt_coins(self) -> int:
        return max(-self.sandbox_coin_balance, 0)

    @property
    def spendable_coins(self) -> int:
        return self.coins + self.sandbox_coins
