"""Coin provenance: which purchase (lot) every coin came from, what it paid for,
and how a refund follows the money. Pure functions of typed values; the store
applies them inside one database transaction.

Vocabulary:

- a **lot** is one credited purchase: its coins, and how many are still open (unspent);
- a **consumption** is coins of one lot used by one movement: a gift (which gave a
  creator diamonds), a spend (``SpendCoins``), or the repayment of a refund debt;
- a **leg** is one part of a refund clawback: the lot's unspent coins, the diamonds a
  gift of its coins gave a creator, or coins spent on services that become debt.

Rules:

- Spending takes coins from open lots in **credit order** (ascending lot id: the oldest
  credited first, whatever the store's purchase time), real and Sandbox alike.
- A creator always receives the catalog's diamonds for a gift; only their attribution
  to the source lots is split, by largest remainder so the parts sum exactly. When some
  of the coins were Sandbox coins, every real part is rounded down and the Sandbox
  parts take the rest: rounding never turns Sandbox value into real diamonds.
- A refund's target is cumulative (the refunded share of the purchase, rounded down)
  and only the difference to what was already clawed back moves. It is taken, in this
  order, from (1) the lot's unspent coins; (2) the lot's consumptions, **newest first**:
  a gift's share of diamonds from that creator's unreserved diamonds, then from holds
  not yet submitted to a payout provider (newest hold first), and what cannot be taken
  becomes the creator's diamond debt; coins spent on services (or used to repay an
  earlier debt) become the buyer's debt. A consumption's diamonds are clawed in
  proportion to its clawed coins, rounded down, and exactly in full once all its
  coins are.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from services.wallet.domain.ledger import Environment


class ConsumptionKind(enum.Enum):
    GIFT = "GIFT"
    SPEND = "SPEND"
    DEBT_REPAYMENT = "DEBT_REPAYMENT"
    UNTRACKED = "UNTRACKED"  # spent before provenance was recorded; a refund of it becomes the buyer's debt


class LegKind(enum.Enum):
    UNSPENT = "UNSPENT"  # the lot's own unspent coins
    GIFT = "GIFT"  # diamonds a gift of the lot's coins gave a creator
    DEBT = "DEBT"  # coins spent on services (or on a debt) become the buyer's debt


@dataclass(frozen=True, slots=True)
class OpenLot:
    lot_id: int
    environment: Environment
    open_coins: int


@dataclass(frozen=True, slots=True)
class Take:
    """Coins one movement takes from one lot."""

    lot_id: int
    environment: Environment
    coins: int


def take_coins(lots: Sequence[OpenLot], coins: int) -> list[Take]:
    """Take ``coins`` from ``lots`` oldest credited first; the caller has checked they suffice."""
    return take_in_order(sorted(lots, key=lambda lot: lot.lot_id), coins)[0]


def take_in_order(lots: Sequence[OpenLot], coins: int) -> tuple[list[Take], list[OpenLot]]:
    """:func:`take_coins` from ``lots`` already in credit order (ascending lot id), with the
    lots that stay open after it, still in credit order. Spending takes a prefix of the
    lots, so the lots after the last one it touched are returned as they are."""
    takes: list[Take] = []
    wanted = coins
    for index, lot in enumerate(lots):
        if wanted == 0:
            return takes, list(lots[index:])
        taken = min(lot.open_coins, wanted)
        if taken > 0:
            takes.append(Take(lot.lot_id, lot.environment, taken))
            wanted -= taken
            if taken < lot.open_coins:
                return takes, [OpenLot(lot.lot_id, lot.environment, lot.open_coins - taken), *lots[index + 1 :]]
    if wanted:
        raise ValueError(f"the lots hold {coins - wanted} coins, {coins} needed")
    return takes, []


def attribute(diamonds: int, takes: Sequence[Take]) -> list[int]:
    """Split ``diamonds`` over ``takes`` in proportion to their coins; the parts sum exactly.

    Each part starts at its exact share rounded down. The diamonds left over go one
    at a time to the largest remainders (the older lot first on a tie). If any take is
    Sandbox, the leftover goes to the Sandbox takes only: real parts stay rounded down.
    """
    if not takes:
        if diamonds:
            raise ValueError("diamonds without coins to attribute them to")
        return []
    if len(takes) == 1:
        return [diamonds]  # the common case, and what the rule below gives for one take
    coins = sum(t.coins for t in takes)
    parts = [diamonds * t.coins // coins for t in takes]
    remainders = [diamonds * t.coins % coins for t in takes]
    left = diamonds - sum(parts)
    sandbox = [i for i, t in enumerate(takes) if t.environment is Environment.SANDBOX]
    eligible = sandbox or list(range(len(takes)))
    ranked = sorted(eligible, key=lambda i: (-remainders[i], takes[i].lot_id))
    for n in range(left):
        parts[ranked[n % len(ranked)]] += 1
    return parts


# ------------------------------------------------------------------ clawback


@dataclass(frozen=True)
class Consumption:
    """One consumption of the refunded lot, as the clawback needs it."""

    consumption_id: int
    kind: ConsumptionKind
    coins: int  # coins of the lot it used (net of any repayment undone)
    clawed_coins: int
    creator: str | None = None
    diamonds: int = 0  # diamonds of the gift attributed to this lot
    clawed_diamonds: int = 0


@dataclass(frozen=True)
class Hold:
    """A hold on a creator's diamonds that a clawback may shrink."""

    reservation_id: str
    diamonds: int


@dataclass(frozen=True)
class CreatorDiamonds:
    """A creator's diamonds in one currency at refund time."""

    balance: int  # the unreserved balance row; negative is diamond debt
    holds: tuple[Hold, ...] = ()  # shrinkable holds, newest first


@dataclass(frozen=True)
class Leg:
    kind: LegKind
    coins: int
    consumption_id: int | None = None
    creator: str | None = None
    diamonds: int = 0  # diamonds clawed in all: from_balance + held + debt
    from_balance: int = 0  # taken from the creator's unreserved diamonds
    from_holds: tuple[tuple[str, int], ...] = ()  # (reservation id, diamonds) holds shrunk
    debt: int = 0  # became the creator's diamond debt


@dataclass
class ClawbackPlan:
    legs: list[Leg] = field(default_factory=list)
    creators: dict[str, CreatorDiamonds] = field(default_factory=dict)  # their state after the clawback

    @property
    def coins(self) -> int:
        return sum(leg.coins for leg in self.legs)


def clawback_target(coins: int, quantity: int, refunded_quantity: int, percentage_milli: int, full: bool) -> int:
    """Coins to claw back in total for the cumulative refund state a store reports.

    Rounding: partial refunds round DOWN (in the buyer's favour), so clawbacks never
    exceed what was credited. ``full`` claws everything; a quantity at or above the
    purchase's is the whole purchase too.
    """
    if full:
        return coins
    if percentage_milli > 0:
        return coins * min(percentage_milli, PERCENT_MILLI_FULL) // PERCENT_MILLI_FULL
    return coins * min(refunded_quantity, quantity) // quantity


PERCENT_MILLI_FULL = 100_000


def plan_clawback(
    delta: int,
    unspent: int,
    consumptions: Sequence[Consumption],
    creators: Mapping[str, CreatorDiamonds],
) -> ClawbackPlan:
    """The legs that claw back ``delta`` more coins of one lot (see the module's rules).

    ``consumptions`` in any order (they are taken newest first, by id); ``creators``
    holds the state of every creator a gift consumption names.
    """
    plan = ClawbackPlan(creators=dict(creators))
    wanted = delta
    from_unspent = min(unspent, wanted)
    if from_unspent > 0:
        plan.legs.append(Leg(LegKind.UNSPENT, from_unspent))
        wanted -= from_unspent
    for consumption in sorted(consumptions, key=lambda c: -c.consumption_id):
        if wanted == 0:
            break
        coins = min(consumption.coins - consumption.clawed_coins, wanted)
        if coins <= 0:
            continue
        wanted -= coins
        if consumption.kind is not ConsumptionKind.GIFT or consumption.creator is None:
            plan.legs.append(Leg(LegKind.DEBT, coins, consumption.consumption_id))
            continue
        clawed = consumption.clawed_coins + coins
        target = consumption.diamonds * clawed // consumption.coins
        diamonds = target - consumption.clawed_diamonds
        creator = consumption.creator
        state, leg = _take_diamonds(plan.creators[creator], diamonds)
        plan.creators[creator] = state
        plan.legs.append(replace(leg, coins=coins, consumption_id=consumption.consumption_id, creator=creator))
    if wanted:
        raise ValueError(f"lot cannot cover the clawback: {wanted} coins unaccounted for")
    return plan


def _take_diamonds(state: CreatorDiamonds, diamonds: int) -> tuple[CreatorDiamonds, Leg]:
    from_balance = min(max(state.balance, 0), diamonds)
    left = diamonds - from_balance
    holds: list[Hold] = []
    shrunk: list[tuple[str, int]] = []
    for hold in state.holds:
        taken = min(hold.diamonds, left)
        if taken > 0:
            shrunk.append((hold.reservation_id, taken))
            left -= taken
        holds.append(Hold(hold.reservation_id, hold.diamonds - taken))
    debt = left
    after = CreatorDiamonds(state.balance - from_balance - debt, tuple(holds))
    return after, Leg(
        LegKind.GIFT, 0, diamonds=diamonds, from_balance=from_balance, from_holds=tuple(shrunk), debt=debt
    )


def restore_repayments(excess: int, repayments: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Which debt repayments a restore undoes once the buyer's debt is gone.

    ``repayments`` are (consumption id, coins still repaid), any order; returns
    (consumption id, coins to undo), newest first, summing to ``excess``.
    """
    undo: list[tuple[int, int]] = []
    left = excess
    for consumption_id, coins in sorted(repayments, key=lambda r: -r[0]):
        if left == 0:
            break
        taken = min(coins, left)
        if taken > 0:
            undo.append((consumption_id, taken))
            left -= taken
    if left:
        raise ValueError(f"{left} restored coins match no debt and no repayment")
    return undo
