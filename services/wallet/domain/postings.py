"""The postings of every movement, as balanced lists (see the README's postings table).

Each recipe returns postings that :func:`ledger.balanced` accepts: per currency they
sum to zero, so Sandbox value (its own currencies) can never leak into real value.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from services.wallet.domain.holds import CommitPlan
from services.wallet.domain.ledger import (
    GIFT_REVENUE,
    PAYOUT_CLEARING,
    SPEND_REVENUE,
    Currency,
    Environment,
    Posting,
    Store,
    clawback_account,
    coin_currency,
    diamond_currency,
    hold_account,
    promotions_expense,
    purchase_clearing,
)
from services.wallet.domain.provenance import Leg, LegKind, Take


def purchase(account_id: str, store: Store, environment: Environment, coins: int, bonus_coins: int) -> list[Posting]:
    """Coins issued for a purchase: the paid part from the store's clearing, the bonus from promotions."""
    currency = coin_currency(environment)
    return [
        Posting(account_id, currency, coins),
        Posting(purchase_clearing(store, environment), currency, bonus_coins - coins),
        Posting(promotions_expense(environment), currency, -bonus_coins),
    ]


def coins_by_currency(takes: Sequence[Take]) -> dict[Currency, int]:
    if len(takes) == 1:
        return {coin_currency(takes[0].environment): takes[0].coins}
    totals: dict[Currency, int] = defaultdict(int)
    for take in takes:
        totals[coin_currency(take.environment)] += take.coins
    return dict(totals)


def diamonds_by_currency(takes: Sequence[Take], parts: Sequence[int]) -> dict[Currency, int]:
    if len(takes) == 1 and len(parts) == 1:
        return {diamond_currency(takes[0].environment): parts[0]}
    totals: dict[Currency, int] = defaultdict(int)
    for take, part in zip(takes, parts, strict=True):
        totals[diamond_currency(take.environment)] += part
    return dict(totals)


def gift(sender: str, creator: str, takes: Sequence[Take], parts: Sequence[int]) -> list[Posting]:
    """The sender's coins to gift revenue; diamonds issued to the creator, each in the pair its lots paid in."""
    return gift_totals(sender, creator, coins_by_currency(takes), diamonds_by_currency(takes, parts))


def gift_totals(
    sender: str, creator: str, coins: Mapping[Currency, int], diamonds: Mapping[Currency, int]
) -> list[Posting]:
    """:func:`gift` from its totals per currency (``coins_by_currency``, ``diamonds_by_currency``)."""
    postings: list[Posting] = []
    for currency, amount in coins.items():
        postings += [Posting(sender, currency, -amount), Posting(GIFT_REVENUE, currency, amount)]
    for currency, amount in diamonds.items():
        postings += [Posting(GIFT_REVENUE, currency, -amount), Posting(creator, currency, amount)]
    return postings


def spend(account_id: str, takes: Sequence[Take]) -> list[Posting]:
    postings: list[Posting] = []
    for currency, coins in coins_by_currency(takes).items():
        postings += [Posting(account_id, currency, -coins), Posting(SPEND_REVENUE, currency, coins)]
    return postings


def clawback(buyer: str, environment: Environment, legs: Sequence[Leg], *, restore: bool = False) -> list[Posting]:
    """A refund's legs (``restore``: their exact reversal).

    UNSPENT and DEBT legs take the coins from the buyer (into debt if they are gone);
    a GIFT leg takes the gift's coins back out of gift revenue and the diamonds from
    the creator's balance and holds (the balance may go negative: diamond debt). A
    restore gives a GIFT leg's diamonds back to the creator's balance, holds or not.
    """
    coin, diamond = coin_currency(environment), diamond_currency(environment)
    sign = -1 if restore else 1
    sink = clawback_account(environment)
    postings: list[Posting] = []
    for leg in legs:
        postings.append(Posting(sink, coin, sign * leg.coins))
        if leg.kind is not LegKind.GIFT:
            postings.append(Posting(buyer, coin, -sign * leg.coins))
            continue
        assert leg.creator is not None
        postings += [
            Posting(GIFT_REVENUE, coin, -sign * leg.coins),
            Posting(GIFT_REVENUE, diamond, sign * leg.diamonds),
        ]
        if restore:
            postings.append(Posting(leg.creator, diamond, leg.diamonds))
            continue
        postings.append(Posting(leg.creator, diamond, -(leg.from_balance + leg.debt)))
        held = sum(diamonds for _, diamonds in leg.from_holds)
        postings.append(Posting(hold_account(leg.creator), diamond, -held))
    return postings


def reserve(account_id: str, diamonds: int) -> list[Posting]:
    return [
        Posting(account_id, Currency.DIAMOND, -diamonds),
        Posting(hold_account(account_id), Currency.DIAMOND, diamonds),
    ]


def resolve(account_id: str, diamonds: int, committed: bool) -> list[Posting]:
    """A hold leaves for payout clearing (committed) or goes back to the creator."""
    destination = PAYOUT_CLEARING if committed else account_id
    return [
        Posting(hold_account(account_id), Currency.DIAMOND, -diamonds),
        Posting(destination, Currency.DIAMOND, diamonds),
    ]


def commit(account_id: str, plan: CommitPlan) -> list[Posting]:
    """A paid cash-out: its hold's part and the shortfall (unreserved diamonds, other holds,
    debt) leave for payout clearing; the hold's excess goes back to the creator."""
    others = sum(taken for _, taken in plan.from_holds)
    return [
        Posting(hold_account(account_id), Currency.DIAMOND, -(plan.from_hold + plan.returned + others)),
        Posting(account_id, Currency.DIAMOND, plan.returned - plan.from_balance - plan.debt),
        Posting(PAYOUT_CLEARING, Currency.DIAMOND, plan.paid),
    ]
