"""Payouts that cannot pay twice, end to end: the real wallet and payouts services on
PostgreSQL, a real worker (with beat: the sweeper runs) on Redis and on RabbitMQ, and the
PayPal simulator.

- a hold that would lapse before submission: the cash-out is EXPIRED, never paid, the
  diamonds are back, and the creator can request again;
- a crash between the cash-out row and its hold: the sweeper finishes it, and the client's
  retry with the same request id gets the original answer;
- refund clawbacks while cash-outs are requested (re-quoted or CLAWED_BACK), submitted
  (debt, netted by the next gift) and paid (debt);
- ambiguous provider answers (a timeout, a refused re-submission, a duplicate without a
  link): no item failed and none paid twice; enough of them park the submission.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common.db import Database
from services.payouts.domain.model import derived_id
from services.payouts.store import chunks, daily_totals
from services.wallet.audit import audit
from tests.payouts.conftest import start_service
from tests.payouts.harness import PayPalSimServer, Worker, payouts_settings, write_catalog
from tests.payouts.test_pipeline import purge
from tests.payouts.test_service import details
from tests.payouts.test_with_wallet import Payouts, diamonds, ledger
from tests.support.failpoints import fired_pid
from tests.support.tokens import Keys
from tests.support.waiting import eventually
from tests.wallet.support import Wallet, running_wallet

pytestmark = [pytest.mark.timeout(300), pytest.mark.postgres, pytest.mark.broker]


@dataclass
class Stack:
    wallet: Wallet
    payouts: Payouts
    database: Database
    paypal: PayPalSimServer
    settings: Any
    tmp_path: Path
    keys: Keys
    workers: list[Worker]

    def worker(self, name: str = "worker") -> Worker:
        self.workers.append(Worker(self.settings, self.tmp_path / name).start())
        return self.workers[-1]

    async def cashout(self, cashout_id: str) -> pb.Cashout:
        reply = await self.payouts.stub.GetCashout(
            pb.GetCashoutRequest(cashout_id=cashout_id), metadata=self.keys.metadata("payouts:request")
        )
        return reply.cashout

    async def batch(self, request_id: str) -> str:
        created = await self.payouts.stub.CreatePayoutBatch(
            pb.CreatePayoutBatchRequest(request_id=request_id), metadata=self.keys.metadata("payouts:ops")
        )
        return created.batch.batch_id

    async def batch_state(self, batch_id: str) -> pb.PayoutBatch:
        reply = await self.payouts.stub.GetPayoutBatch(
            pb.GetPayoutBatchRequest(batch_id=batch_id), metadata=self.keys.metadata("payouts:ops")
        )
        return reply.batch

    async def refund(self, stx: str) -> wpb.ReversePurchaseResponse:
        return await self.wallet.stub.ReversePurchase(
            wpb.ReversePurchaseRequest(
                request_id=f"rev-{stx}",
                store=wpb.STORE_APP_STORE,
                environment=wpb.STORE_ENVIRONMENT_PRODUCTION,
                store_transaction_id=stx,
                full_refund=True,
            ),
            metadata=self.wallet.md(),
        )

    async def earn(self, creator: str, amount: int) -> str:
        """``amount`` diamonds for ``creator`` from one purchase; returns its store transaction id."""
        stx, fan = f"stx-{uuid.uuid4().hex[:8]}", f"fan-{uuid.uuid4().hex[:6]}"
        await self.wallet.credit(fan, amount, stx=stx)
        await self.wallet.gift(fan, creator, "rose", count=amount)
        return stx


@asynccontextmanager
async def stack(
    tmp_path: Path, url: str, broker: str, keys: Keys, paypal: PayPalSimServer, **overrides: Any
) -> AsyncIterator[Stack]:
    async with running_wallet(url, keys, tmp_path) as wallet:
        settings = payouts_settings(
            database_url=url,
            broker_url=broker,
            catalog=write_catalog(tmp_path),
            keys=keys,
            wallet_address=wallet.address,
            paypal_url=paypal.api_url,
            **overrides,
        )
        host, database, channel = await start_service(settings)
        payouts = Payouts(pb_grpc.PayoutServiceStub(channel), keys)
        running = Stack(wallet, payouts, database, paypal, settings, tmp_path, keys, [])
        try:
            yield running
        finally:
            for worker in running.workers:
                worker.kill()
            await channel.close(None)
            await host.stop()  # type: ignore[attr-defined]
            database.close()
            purge(broker, settings.payout_queue)


def day_total(database: Database, creator: str) -> int:
    """What counts toward the creator's daily limit (minor units, every day summed)."""
    with database.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(daily_totals.c.amount_minor), 0)).where(
                    daily_totals.c.creator_account_id == creator
                )
            ).scalar_one()
        )


def payments(paypal: PayPalSimServer) -> Counter[str]:
    """Payments the simulator made, by cash-out id (any attempt)."""
    return Counter(p["sender_item_id"].rsplit("-", 1)[0] for p in paypal.payments()["payments"])


async def test_a_hold_that_would_lapse_is_expired_never_paid_and_the_creator_may_ask_again(
    tmp_path: Path, postgres_url: str, server_broker_url: str, keys: Keys, paypal: PayPalSimServer
) -> None:
    # One-day holds, and a margin just under a day: every hold would lapse before the next batch.
    async with stack(
        tmp_path,
        postgres_url,
        server_broker_url,
        keys,
        paypal,
        payout_reservation_days=1,
        payout_hold_margin_seconds=86_399.0,
        payout_sweep_seconds=0.5,
    ) as s:
        await s.payouts.onboard("lapsing")
        await s.earn("lapsing", 20_000)
        cashout = await s.payouts.request("lapsing", 20_000)
        assert await diamonds(s.wallet, "lapsing") == (20_000, 20_000, 0)
        s.worker()

        async def expired() -> pb.Cashout | None:
            found = await s.cashout(cashout.cashout_id)
            return found if found.state == pb.CASHOUT_STATE_EXPIRED else None

        found = await eventually(expired, "the sweeper to expire the cash-out", 90)
        assert found.failure_reason == "HOLD_EXPIRED"
        await eventually(
            lambda: _equals(diamonds(s.wallet, "lapsing"), (20_000, 0, 20_000)),
            "the released diamonds to come back",
            90,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await s.batch("after-expiry")
        assert details(caught.value)[0] == "NO_ELIGIBLE_CASHOUTS"
        assert payments(s.paypal) == Counter()
        assert day_total(s.database, "lapsing") == 0  # 20,000 diamonds were $100.00 of the day's limit
        # The creator asks again: a new cash-out with a new hold.
        again = await s.payouts.stub.RequestCashout(
            pb.RequestCashoutRequest(request_id="again", creator_account_id="lapsing", diamonds=20_000),
            metadata=keys.metadata("payouts:request"),
        )
        assert again.cashout.state == pb.CASHOUT_STATE_REQUESTED
        assert again.cashout.cashout_id != cashout.cashout_id
        assert audit(s.wallet.database) == []


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


ROW_POINT = "payouts.cashout.after_row"


async def test_a_crash_between_the_row_and_the_hold_is_finished_and_the_retry_gets_the_answer(
    tmp_path: Path, postgres_url: str, server_broker_url: str, keys: Keys, paypal: PayPalSimServer
) -> None:
    points = tmp_path / "failpoints"
    async with stack(
        tmp_path,
        postgres_url,
        server_broker_url,
        keys,
        paypal,
        payout_stuck_seconds=2.0,
        payout_sweep_seconds=0.5,
        failpoints=f"{ROW_POINT}=error",
        failpoints_dir=points,
    ) as s:
        await s.payouts.onboard("crashy")
        await s.earn("crashy", 25_000)
        request = pb.RequestCashoutRequest(request_id="crash-1", creator_account_id="crashy", diamonds=20_000)
        with pytest.raises(grpc.aio.AioRpcError):
            await s.payouts.stub.RequestCashout(request, metadata=keys.metadata("payouts:request"))
        assert fired_pid(points, ROW_POINT) is not None
        cashout_id = derived_id("co", "crash-1")
        left = await s.cashout(cashout_id)
        assert left.state == pb.CASHOUT_STATE_RESERVING
        assert await diamonds(s.wallet, "crashy") == (25_000, 0, 25_000)
        # No client retry: the sweeper makes the same hold and finishes the cash-out.
        s.worker()

        async def finished() -> bool:
            return (await s.cashout(cashout_id)).state == pb.CASHOUT_STATE_REQUESTED

        await eventually(finished, "the sweeper to finish the RESERVING row", 90)
        assert await diamonds(s.wallet, "crashy") == (25_000, 20_000, 5_000)
        # The client's retry with the same request id: the original cash-out, no second hold.
        reply = await s.payouts.stub.RequestCashout(request, metadata=keys.metadata("payouts:request"))
        assert (reply.cashout.cashout_id, reply.cashout.state) == (cashout_id, pb.CASHOUT_STATE_REQUESTED)
        assert reply == await s.payouts.stub.RequestCashout(request, metadata=keys.metadata("payouts:request"))
        assert await diamonds(s.wallet, "crashy") == (25_000, 20_000, 5_000)
        assert [c.cashout_id for c in await s.payouts.cashouts("crashy")] == [cashout_id]
        assert audit(s.wallet.database) == []


async def test_refund_clawbacks_while_cash_outs_are_requested_submitted_and_paid(
    tmp_path: Path, postgres_url: str, server_broker_url: str, keys: Keys, paypal: PayPalSimServer
) -> None:
    async with stack(tmp_path, postgres_url, server_broker_url, keys, paypal) as s:
        for creator in ("requote", "cancel", "inflight", "paid"):
            await s.payouts.onboard(creator)
        # Each cashes out everything, so a refund has to take from the hold.
        refunded = {"requote": await s.earn("requote", 15_000), "cancel": await s.earn("cancel", 18_000)}
        await s.earn("requote", 11_000)
        await s.earn("cancel", 9_000)
        refunded["inflight"] = await s.earn("inflight", 20_000)
        refunded["paid"] = await s.earn("paid", 20_000)
        cashouts = {c: await s.payouts.request(c, d) for c, d in [("requote", 26_000), ("cancel", 27_000)]}
        cashouts |= {c: await s.payouts.request(c, 20_000) for c in ("inflight", "paid")}
        # While requested: the refunds shrink the holds to 11,000 (still ≥ the 10,000 minimum) and 9,000.
        await s.refund(refunded["requote"])
        await s.refund(refunded["cancel"])
        s.paypal.faults(final_delay_seconds=4)
        s.worker()
        batch_id = await s.batch("first")

        async def submitted() -> bool:
            return (await s.cashout(cashouts["inflight"].cashout_id)).state == pb.CASHOUT_STATE_SUBMITTED

        await eventually(submitted, "the in-flight cash-out to be submitted", 90)
        # While submitted: its hold cannot shrink, so the creator owes the diamonds instead.
        reply = await s.refund(refunded["inflight"])
        assert [(leg.diamonds_from_holds, leg.diamond_debt) for leg in reply.legs] == [(0, 20_000)]

        async def completed() -> bool:
            return (await s.batch_state(batch_id)).state == pb.BATCH_STATE_COMPLETED

        await eventually(completed, "the first batch to complete", 90)
        requoted = await s.cashout(cashouts["requote"].cashout_id)
        assert (requoted.state, requoted.diamonds, requoted.amount.amount_minor) == (
            pb.CASHOUT_STATE_REQUESTED,
            11_000,
            5_500,
        )
        cancelled = await s.cashout(cashouts["cancel"].cashout_id)
        assert (cancelled.state, cancelled.failure_reason) == (pb.CASHOUT_STATE_CANCELLED, "CLAWED_BACK")
        # The day's totals follow: the re-quoted amount only ($130.00 before), nothing for the clawed back.
        assert (day_total(s.database, "requote"), day_total(s.database, "cancel")) == (5_500, 0)
        await eventually(
            lambda: _equals(diamonds(s.wallet, "cancel"), (9_000, 0, 9_000)), "the cancelled hold to be released", 90
        )
        for creator in ("inflight", "paid"):
            assert (await s.cashout(cashouts[creator].cashout_id)).state == pb.CASHOUT_STATE_PAID
        inflight = await s.wallet.balance("inflight")
        assert (inflight.diamonds, inflight.diamond_debt) == (0, 20_000)
        # Netting: the next gifts repay the debt before anything can be cashed out.
        await s.earn("inflight", 5_000)
        assert (await s.wallet.balance("inflight")).diamond_debt == 15_000
        # Once paid: a refund makes debt as well.
        await s.refund(refunded["paid"])
        assert (await s.wallet.balance("paid")).diamond_debt == 20_000
        # The re-quoted cash-out is paid at its new amount in the next batch.
        s.paypal.faults(final_delay_seconds=0)
        second = await s.batch("second")

        async def second_done() -> bool:
            return (await s.batch_state(second)).state == pb.BATCH_STATE_COMPLETED

        await eventually(second_done, "the second batch to complete", 90)
        assert (await s.cashout(cashouts["requote"].cashout_id)).state == pb.CASHOUT_STATE_PAID
        assert await diamonds(s.wallet, "requote") == (0, 0, 0)
        made = {p["sender_item_id"].rsplit("-", 1)[0]: p["amount"]["value"] for p in s.paypal.payments()["payments"]}
        assert made == {
            cashouts["requote"].cashout_id: "55.00",
            cashouts["inflight"].cashout_id: "100.00",
            cashouts["paid"].cashout_id: "100.00",
        }
        assert max(payments(s.paypal).values()) == 1
        assert audit(s.wallet.database) == []


async def test_ambiguous_answers_never_fail_an_item_or_pay_it_twice(
    tmp_path: Path, postgres_url: str, server_broker_url: str, keys: Keys, paypal: PayPalSimServer
) -> None:
    async with stack(
        tmp_path, postgres_url, server_broker_url, keys, paypal, paypal_timeout_seconds=1.5, payout_park_after=2
    ) as s:
        creators = [f"amb-{i}" for i in range(4)]
        for creator in creators:
            await s.payouts.onboard(creator)
            await s.earn(creator, 40_000)
            await s.payouts.request(creator, 20_000)
        # The first call pays but times out; the re-submission is refused with a plain 422, then a
        # duplicate answer links the original batch.
        s.paypal.faults(submit_timeouts=1, stall_seconds=4, resubmit_rejections=1)
        s.worker()
        first = await s.batch("amb-first")

        async def done(batch_id: str) -> bool:
            return (await s.batch_state(batch_id)).state == pb.BATCH_STATE_COMPLETED

        await eventually(lambda: done(first), "the batch to complete", 90)
        states = [c.state for creator in creators for c in await s.payouts.cashouts(creator)]
        assert states == [pb.CASHOUT_STATE_PAID] * 4
        paid = [c.cashout_id for creator in creators for c in await s.payouts.cashouts(creator)]
        assert payments(s.paypal) == Counter(paid)
        posted, clearing = ledger(s.wallet)
        assert clearing == 4 * 20_000
        assert all(count == 1 for count in posted.values())
        # Again with duplicates that never link the original: parked for ops, nothing failed or released.
        for creator in creators:
            await s.payouts.stub.RequestCashout(
                pb.RequestCashoutRequest(request_id=f"{creator}-2", creator_account_id=creator, diamonds=20_000),
                metadata=keys.metadata("payouts:request"),
            )
        s.paypal.faults(submit_timeouts=1, stall_seconds=4, duplicates_without_link=5)
        second = await s.batch("amb-second")

        def parked() -> list[str]:
            with s.database.connect() as conn:
                return list(
                    conn.execute(
                        sa.select(chunks.c.park_reason).where(chunks.c.batch_id == second, chunks.c.state == "PARKED")
                    ).scalars()
                )

        reasons = await eventually(parked, "the submission to be parked", 90)
        assert "links no batch" in reasons[0]
        second_items = [c for creator in creators for c in await s.payouts.cashouts(creator) if c.batch_id == second]
        assert {c.state for c in second_items} == {pb.CASHOUT_STATE_SUBMITTED}
        for creator in creators:
            assert await diamonds(s.wallet, creator) == (20_000, 20_000, 0)
        assert max(payments(s.paypal).values()) == 1
        assert max(Counter(p["sender_item_id"] for p in s.paypal.payments()["payments"]).values()) == 1
        assert audit(s.wallet.database) == []
