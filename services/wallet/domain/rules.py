"""Pure rules of the wallet: spending-limit periods and changes, reservation refusals.
(Lots, attribution and refund clawbacks are in ``provenance``.)"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.wallet.domain.ledger import BalanceView
from services.wallet.errors import FailedPrecondition

LIMIT_COOL_OFF = timedelta(hours=24)


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
    SUBMITTED = "SUBMITTED"  # a payout provider may be paying against it: never expires, never shrinks


OPEN_HOLDS = (ReservationState.HELD, ReservationState.SUBMITTED)


def refuse_reservation(diamonds: int, view: BalanceView) -> None:
    """Raise the documented refusal if ``diamonds`` cannot be reserved from ``view``.

    Only real, matured, unreserved diamonds can be held: Sandbox diamonds never can."""
    if view.restricted:
        raise FailedPrecondition("ACCOUNT_RESTRICTED", "the account owes coins from a refund")
    if view.diamond_debt:
        raise FailedPrecondition(
            "DIAMOND_DEBT",
            f"the account owes {view.diamond_debt} diamonds from refunded gifts; later gifts repay them first",
        )
    if view.diamonds_total < diamonds:
        if view.diamonds_total + max(view.sandbox_diamonds, 0) >= diamonds:
            raise FailedPrecondition(
                "SANDBOX_NOT_WITHDRAWABLE",
                f"only {view.diamonds_total} of the account's diamonds are real; Sandbox diamonds cannot be cashed out",
            )
        raise FailedPrecondition(
            "INSUFFICIENT_DIAMONDS", f"the account holds {view.diamonds_total} diamonds, {diamonds} requested"
        )
    if view.diamonds_withdrawable < diamonds:
        raise FailedPrecondition(
            "DIAMONDS_NOT_MATURE",
            f"only {view.diamonds_withdrawable} diamonds are matured and unreserved, {diamonds} requested",
        )


def resolved_error(state: ReservationState) -> FailedPrecondition:
    """The refusal for resolving a reservation that is no longer held."""
    reason = "RESERVATION_EXPIRED" if state is ReservationState.EXPIRED else f"RESERVATION_ALREADY_{state.value}"
    return FailedPrecondition(reason, f"the reservation is already {state.value.lower()}")
