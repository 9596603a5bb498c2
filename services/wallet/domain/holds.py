"""Pure rules of settling a cash-out's hold: what a paid commit takes, and from where.

A hold is HELD (it may expire, and a refund clawback may shrink it) until a payout
provider may be paying against it: then it is SUBMITTED, never expires and never
shrinks, and only a commit or a release ends it.

**Paid means debited, exactly once.** A commit names the diamonds the provider paid
for. They come from the hold first; what it holds beyond them goes back to the
creator; what it lacks (it expired, was released, or a clawback shrank it) is the
**shortfall**, taken from the creator's unreserved diamonds, then from their other
unsubmitted holds (newest first), and the rest becomes their diamond debt. A
shortfall is flagged for review.

**A release pays what the hold owes first.** A clawback that met a submitted hold
made the creator's diamond row negative (diamond debt); released diamonds go to
that row, so they repay the debt before the creator can use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.wallet.domain.provenance import Hold

PAID_BEYOND_HOLD = "PAID_BEYOND_HOLD"


@dataclass(frozen=True)
class CommitPlan:
    from_hold: int  # the hold's own diamonds paid out
    returned: int  # the hold's diamonds beyond the paid amount, back to the creator
    from_balance: int  # shortfall from the creator's unreserved diamonds
    from_holds: tuple[tuple[str, int], ...]  # shortfall from other unsubmitted holds
    debt: int  # shortfall that became diamond debt

    @property
    def shortfall(self) -> int:
        return self.from_balance + sum(taken for _, taken in self.from_holds) + self.debt

    @property
    def paid(self) -> int:
        return self.from_hold + self.shortfall


def plan_commit(paid: int, held: int, balance: int, others: Sequence[Hold]) -> CommitPlan:
    """Debit ``paid`` diamonds for a hold that still holds ``held``; ``balance`` is the
    creator's unreserved row (negative: debt), ``others`` their unsubmitted holds, newest first."""
    from_hold = min(paid, held)
    short = paid - from_hold
    from_balance = min(max(balance, 0), short)
    left = short - from_balance
    taken: list[tuple[str, int]] = []
    for hold in others:
        part = min(hold.diamonds, left)
        if part > 0:
            taken.append((hold.reservation_id, part))
            left -= part
    return CommitPlan(from_hold, held - from_hold, from_balance, tuple(taken), left)


def debt_repaid(released: int, balance: int) -> int:
    """Of ``released`` diamonds going back to a row at ``balance``, the part that repays its debt."""
    return min(released, max(-balance, 0))
