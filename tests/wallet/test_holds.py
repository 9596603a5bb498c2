"""Holds a payout provider may be paying against, through a real wallet server on SQLite
and PostgreSQL: SUBMITTED never expires and never shrinks; a paid commit debits exactly
once whatever happened to the hold (shortfall: unreserved → other holds → debt, flagged);
a release pays what a clawback left owing first; settling in batches keeps each item's
exactly-once key and answer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from services.wallet import tables
from services.wallet.audit import audit, holds_to_review
from tests.wallet.support import Wallet, unique
from tests.wallet.test_purchases_reservations import commit, ledger_sums, refused, release, reserve
from tests.wallet.test_refunds import reverse

COMMIT, RELEASE = pb.SettleItem.ACTION_COMMIT, pb.SettleItem.ACTION_RELEASE
CLEARING = ("#sys/payout_clearing", "DIAMOND")


async def submit(wallet: Wallet, *items: tuple[str, int]) -> list[pb.SubmitResult]:
    reply = await wallet.stub.SubmitReservations(
        pb.SubmitReservationsRequest(items=[pb.SubmitItem(reservation_id=r, diamonds=d) for r, d in items]),
        metadata=wallet.md("wallet:reserve"),
    )
    return list(reply.results)


async def settle(wallet: Wallet, *items: pb.SettleItem) -> list[pb.SettleResult]:
    reply = await wallet.stub.SettleReservations(
        pb.SettleReservationsRequest(items=items), metadata=wallet.md("wallet:reserve"), timeout=30
    )
    return list(reply.results)


def paid(reservation_id: str, diamonds: int, request_id: str = "") -> pb.SettleItem:
    return pb.SettleItem(
        request_id=request_id or f"commit:{reservation_id}",
        reservation_id=reservation_id,
        action=COMMIT,
        diamonds=diamonds,
    )


def back(reservation_id: str, request_id: str = "") -> pb.SettleItem:
    return pb.SettleItem(
        request_id=request_id or f"release:{reservation_id}",
        reservation_id=reservation_id,
        action=RELEASE,
        reason="failed",
    )


def soon(seconds: float = 60) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(seconds=seconds))
    return stamp


def lapse(wallet: Wallet) -> None:
    """Move the server's clock past the expiry of every hold made with ``soon()``."""
    wallet.clock.advance(timedelta(minutes=2))


async def earn(wallet: Wallet, creator: str, diamonds: int) -> str:
    """Gift ``diamonds`` to ``creator`` from one purchase; returns its store transaction id."""
    stx, fan = unique("stx"), unique("fan")
    await wallet.credit(fan, diamonds, stx=stx)
    await wallet.gift(fan, creator, "rose", count=diamonds)
    return stx


async def test_a_submitted_hold_never_expires_and_a_clawback_makes_debt_instead(wallet: Wallet) -> None:
    creator = unique("star")
    stx = await earn(wallet, creator, 100)
    await reserve(wallet, creator, 100, "sub-1", expire_time=soon())
    [result] = await submit(wallet, ("sub-1", 100))
    assert (result.error_reason, result.reservation.state) == ("", pb.RESERVATION_STATE_SUBMITTED)
    lapse(wallet)
    # A balance read past the expiry does not return a submitted hold, and submitting again is fine.
    balance = await wallet.balance(creator)
    assert (balance.diamonds_reserved, balance.diamonds_withdrawable) == (100, 0)
    assert (await submit(wallet, ("sub-1", 100)))[0].error_reason == ""
    # A refund of the coins that paid for the diamonds cannot shrink it: the creator owes them.
    reply = await reverse(wallet, stx)
    assert [(leg.diamonds_from_holds, leg.diamond_debt) for leg in reply.legs] == [(0, 100)]
    balance = await wallet.balance(creator)
    assert (balance.diamonds_reserved, balance.diamond_debt) == (100, 100)
    assert audit(wallet.database) == []
    # The payout failed: the released diamonds repay the clawback first.
    [released] = await settle(wallet, back("sub-1"))
    assert released.error_reason == ""
    assert (released.reservation.state, released.reservation.diamond_debt_repaid) == (
        pb.RESERVATION_STATE_RELEASED,
        100,
    )
    balance = await wallet.balance(creator)
    assert (balance.diamonds, balance.diamond_debt, balance.diamonds_reserved) == (0, 0, 0)
    assert audit(wallet.database) == []


async def test_submit_refuses_what_a_provider_must_not_pay(wallet: Wallet) -> None:
    creator = unique("star")
    stx = await earn(wallet, creator, 100)
    await earn(wallet, creator, 100)
    await reserve(wallet, creator, 50, "lapsing", expire_time=soon())
    await reserve(wallet, creator, 150, "shrinking")
    lapse(wallet)
    await reverse(wallet, stx)  # nothing unreserved: 100 from the newest hold
    results = await submit(wallet, ("lapsing", 50), ("shrinking", 150), ("nobody", 5))
    assert [r.error_reason for r in results] == ["RESERVATION_EXPIRED", "RESERVATION_SHRUNK", "RESERVATION_NOT_FOUND"]
    assert results[1].reservation.diamonds == 50
    assert results[1].reservation.state == pb.RESERVATION_STATE_HELD
    # At most what is left may be submitted (a re-quote pays less).
    assert (await submit(wallet, ("shrinking", 40)))[0].error_reason == ""
    assert audit(wallet.database) == []


async def test_a_paid_item_is_debited_exactly_once_whatever_happened_to_its_hold(wallet: Wallet) -> None:
    creator = unique("star")
    stx = await earn(wallet, creator, 200)
    await earn(wallet, creator, 700)
    await reserve(wallet, creator, 100, "held")
    await reserve(wallet, creator, 100, "submitted")
    await reserve(wallet, creator, 100, "expired", expire_time=soon())
    await reserve(wallet, creator, 100, "released")
    await reserve(wallet, creator, 200, "spare")
    await reserve(wallet, creator, 300, "shrunk")
    await submit(wallet, ("submitted", 100))
    await reverse(wallet, stx)  # nothing unreserved: 200 from the newest hold
    await release(wallet, "released")
    lapse(wallet)
    assert (await wallet.balance(creator)).diamonds_withdrawable == 200
    before = ledger_sums(wallet).get(CLEARING, 0)
    items = [
        paid("held", 100),
        paid("submitted", 100),
        paid("expired", 100),
        paid("released", 100),
        paid("shrunk", 300),
    ]
    first = await settle(wallet, *items)
    assert [r.error_reason for r in first] == [""] * 5
    assert all(r.reservation.state == pb.RESERVATION_STATE_COMMITTED for r in first)
    assert ledger_sums(wallet)[CLEARING] - before == 700
    # The same items again (a retried settle): the original answers, nothing moves.
    again = await settle(wallet, *items)
    assert again == first
    assert ledger_sums(wallet)[CLEARING] - before == 700
    # A single call under another request id is refused as already committed.
    await refused(commit(wallet, "held"), grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_ALREADY_COMMITTED")
    shortfalls = {r.reservation.reservation_id: r.reservation.diamonds_shortfall for r in first}
    assert shortfalls == {"held": 0, "submitted": 0, "expired": 100, "released": 100, "shrunk": 200}
    # The shrunk hold's shortfall came from the spare hold once the unreserved diamonds were gone.
    balance = await wallet.balance(creator)
    assert (balance.diamonds, balance.diamonds_reserved, balance.diamond_debt) == (0, 0, 0)
    [spare] = await submit(wallet, ("spare", 200))
    assert (spare.error_reason, spare.reservation.diamonds_taken) == ("RESERVATION_SHRUNK", 200)
    assert audit(wallet.database) == []
    flagged = holds_to_review(wallet.database)
    assert sorted(line.split()[2] for line in flagged) == ["expired", "released", "shrunk"]


async def test_a_shortfall_takes_unreserved_then_unsubmitted_holds_then_debt(wallet: Wallet) -> None:
    creator = unique("star")
    await earn(wallet, creator, 300)
    await reserve(wallet, creator, 100, "gone", expire_time=soon())
    await reserve(wallet, creator, 40, "in-flight")
    await submit(wallet, ("in-flight", 40))
    lapse(wallet)
    await reserve(wallet, creator, 200, "newer")
    # Unreserved: 300 − 40 − 200 = 60. Paying 400 for the lapsed hold: 60 unreserved, 200 from
    # the newer hold, never the submitted one, and 140 as diamond debt.
    [result] = await settle(wallet, paid("gone", 400))
    assert result.error_reason == ""
    assert (result.reservation.diamonds_shortfall, result.reservation.diamond_debt) == (400, 140)
    assert result.reservation.review_reason == "PAID_BEYOND_HOLD"
    balance = await wallet.balance(creator)
    assert (balance.diamond_debt, balance.diamonds_reserved) == (140, 40)
    assert audit(wallet.database) == []


async def test_settle_answers_each_item_and_concurrent_duplicates_move_once(wallet: Wallet) -> None:
    creator = unique("star")
    await earn(wallet, creator, 500)
    for n in range(5):
        await reserve(wallet, creator, 100, f"c-{n}")
    await release(wallet, "c-4")
    items = [paid("c-0", 100), paid("c-1", 100), back("c-2"), back("c-4"), paid("missing", 1), back("c-3")]
    runs = await asyncio.gather(*(settle(wallet, *items) for _ in range(4)))
    for results in runs:
        assert [(r.error_code, r.error_reason) for r in results] == [
            ("", ""),
            ("", ""),
            ("", ""),
            ("FAILED_PRECONDITION", "RESERVATION_ALREADY_RELEASED"),
            ("NOT_FOUND", "RESERVATION_NOT_FOUND"),
            ("", ""),
        ]
    assert ledger_sums(wallet)[CLEARING] == 200
    balance = await wallet.balance(creator)
    assert (balance.diamonds, balance.diamonds_reserved) == (300, 0)
    with wallet.database.connect() as conn:
        commits = conn.execute(
            sa.select(sa.func.count())
            .select_from(tables.transactions)
            .where(tables.transactions.c.kind == "RESERVATION_COMMIT")
        ).scalar_one()
    assert commits == 2
    assert audit(wallet.database) == []
    # A request id reused for another body is refused for that item only.
    results = await settle(wallet, paid("c-0", 50), back("c-2"))
    assert [r.error_reason for r in results] == ["REQUEST_ID_REUSED", ""]


async def test_settle_and_submit_validate_the_batch(wallet: Wallet) -> None:
    await refused(settle(wallet), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    await refused(submit(wallet), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    await refused(
        settle(wallet, pb.SettleItem(request_id="x", reservation_id="y")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    await refused(submit(wallet, ("y", 0)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
