"""Pure rules of the wallet: refund clawback arithmetic, spending-limit periods
and changes, reservation refusals."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.wallet.errors import FailedPrecondition

# Refunds are reported by the stores as cumulative state, never as deltas.
PERCENT_MILLI_FULL = 100_000

LIMIT_COOL_OFF = timedelta(hours=24)


def clawback_target(coins: int, quantity: int, refunded_quantity: int, refunded_percentage_milli: int) -> int:
    """Coins that should be clawed back in total for the refund state the store reports.

    Rounding rule: partial refunds round DOWN (in the buyer's favour), so the
    sum of clawbacks never exceeds what was credited. ``refunded_quantity`` = 0
    with no percentage means the whole purchase.
    """
    if refunded_percentage_milli > 0:
        share = min(refunded_percentage_milli, PERCENT_MILLI_FULL)
        return coins * share // PERCENT_MILLI_FULL
    if refunded_quantity == 0 or refunded_quantity >= quantity:
        return coins
    return coins * refunded_quantity // quantity


class Period(enum.Enum):
    DAILY = "DAILY"
    WEEKLY = "WEEKLY"
    MONTHLY = "MONTHLY"


def period_start(period: Period, now: datetime) -> datetime:
    """Start of the current UTC calendar period (weeks start on Monday)."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period is Period.DAILY:
        return day
    if period is Period.WEEKLY:
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


@dataclass(frozen=True)
class LimitState:
    limit_coins: int  # 0 = no limit
    pending_limit_coins: int | None
    pending_effective_at: datetime | None

    def effective(self, now: datetime) -> LimitState:
        """The state with a matured pending change applied."""
        if (
            self.pending_limit_coins is not None
            and self.pending_effective_at is not None
            and self.pending_effective_at <= now
        ):
            return LimitState(self.pending_limit_coins, None, None)
        return self


def change_limit(current: LimitState, new_limit: int, now: datetime) -> tuple[LimitState, bool, datetime]:
    """Apply a requested limit: lowering (or setting a first limit) takes effect at
    once; raising or removing waits out the cool-off. Returns (state, now?, when)."""
    state = current.effective(now)
    old = state.limit_coins
    if new_limit == old:
        return LimitState(old, None, None), True, now
    stricter = new_limit != 0 and (old == 0 or new_limit <= old)
    if stricter:
        return LimitState(new_limit, None, None), True, now
    effective_at = now + LIMIT_COOL_OFF
    return LimitState(old, new_limit, effective_at), False, effective_at


class ReservationState(enum.Enum):
    HELD = "HELD"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"


def refuse_reservation(diamonds: int, total: int, withdrawable: int, restricted: bool) -> None:
    """Raise the documented refusal if ``diamonds`` cannot be reserved."""
    if restricted:
        raise FailedPrecondition("ACCOUNT_RESTRICTED", "the account owes coins from a refund")
    if total < diamonds:
        raise FailedPrecondition("INSUFFICIENT_DIAMONDS", f"the account holds {total} diamonds, {diamonds} requested")
    if withdrawable < diamonds:
        raise FailedPrecondition(
            "DIAMONDS_NOT_MATURE",
            f"only {withdrawable} diamonds are matured and unreserved, {diamonds} requested",
        )


def resolved_error(state: ReservationState) -> FailedPrecondition:
    """The refusal for resolving a reservation that is no longer held."""
    reason = "RESERVATION_EXPIRED" if state is ReservationState.EXPIRED else f"RESERVATION_ALREADY_{state.value}"
    return FailedPrecondition(reason, f"the reservation is already {state.value.lower()}")
