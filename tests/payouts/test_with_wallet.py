"""Payouts against the real wallet service: its refusals reach the creator with the same
reasons and move nothing, and a batch run by real workers (one killed between the wallet's
commit and payouts recording it) debits paid diamonds once, returns failed ones and leaves
the wallet's ledger audit clean."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.wallet.audit import audit
from services.wallet.domain.ledger import PAYOUT_CLEARING, Currency, Kind
from services.wallet.domain.rules import ReservationState
from services.wallet.tables import entries, reservations, transactions
from tests.payouts.conftest import start_service
from tests.payouts.harness import PayPalSimServer, Worker, exit_status, payouts_settings, write_catalog
from tests.payouts.test_service import details
from tests.support.failpoints import failpoint_env, fired_pid
from tests.support.tokens import Keys
from tests.wallet.support import Wallet, running_wallet

pytestmark = pytest.mark.timeout(240)


async def refund(wallet: Wallet, stx: str) -> None:
    await wallet.stub.ReversePurchase(
        wpb.ReversePurchaseRequest(
            request_id=f"rev-{stx}",
            store=wpb.STORE_APP_STORE,
            environment=wpb.STORE_ENVIRONMENT_PRODUCTION,
            store_transaction_id=stx,
            full_refund=True,
        ),
        metadata=wallet.md(),
    )


async def earn(wallet: Wallet, creator: str, diamonds: int) -> None:
    fan = f"fan-{uuid.uuid4().hex[:6]}"
    await wallet.credit(fan, diamonds)
    await wallet.gift(fan, creator, "rose", count=diamonds)


class Payouts:
    def __init__(self, stub: pb_grpc.PayoutServiceAsyncStub, keys: Keys) -> None:
        self.stub = stub
        self.keys = keys

    async def onboard(self, creator: str, receiver: str = "") -> None:
        await self.stub.SetPayoutDestination(
            pb.SetPayoutDestinationRequest(
                request_id=f"d-{creator}",
                creator_account_id=creator,
                destination=pb.PayoutDestination(
                    provider=pb.PROVIDER_PAYPAL, receiver=receiver or f"{creator}@example.com"
                ),
            ),
            metadata=self.keys.metadata("payouts:request"),
        )
        await self.stub.VerifyPayoutDestination(
            pb.VerifyPayoutDestinationRequest(
                request_id=f"v-{creator}",
                creator_account_id=creator,
                provider=pb.PROVIDER_PAYPAL,
                receiver=receiver or f"{creator}@example.com",
            ),
            metadata=self.keys.metadata("payouts:ops"),
        )

    async def request(self, creator: str, diamonds: int) -> pb.Cashout:
        reply = await self.stub.RequestCashout(
            pb.RequestCashoutRequest(request_id=f"r-{creator}", creator_account_id=creator, diamonds=diamonds),
            metadata=self.keys.metadata("payouts:request"),
        )
        return reply.cashout

    async def refusal(self, creator: str, diamonds: int) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.request(creator, diamonds)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        return details(caught.value)[0]

    async def cashouts(self, creator: str) -> list[pb.Cashout]:
        reply = await self.stub.ListCashouts(
            pb.ListCashoutsRequest(creator_account_id=creator), metadata=self.keys.metadata("payouts:request")
        )
        return list(reply.cashouts)


async def diamonds(wallet: Wallet, creator: str) -> tuple[int, int, int]:
    """(total, reserved, withdrawable) diamonds of the creator, as the wallet says."""
    balance = await wallet.balance(creator)
    return balance.diamonds, balance.diamonds_reserved, balance.diamonds_withdrawable


def ledger(wallet: Wallet) -> tuple[Counter[tuple[str, str]], int]:
    """The wallet's reservation transactions by (kind, reservation id), and the diamonds in payout clearing."""
    kinds = [Kind.RESERVATION_COMMIT.value, Kind.RESERVATION_RELEASE.value]
    with wallet.database.engine.connect() as conn:
        posted = Counter(
            (r.kind, r.reference)
            for r in conn.execute(
                sa.select(transactions.c.kind, transactions.c.reference).where(transactions.c.kind.in_(kinds))
            )
        )
        # A system account keeps no balance row: its entries are its balance.
        clearing = conn.execute(
            sa.select(sa.func.sum(entries.c.amount)).where(
                entries.c.account_id == PAYOUT_CLEARING, entries.c.currency == Currency.DIAMOND.value
            )
        ).scalar()
    return posted, int(clearing or 0)


def committed_in_wallet(wallet: Wallet) -> list[str]:
    with wallet.database.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(reservations.c.reservation_id).where(reservations.c.state == ReservationState.COMMITTED.value)
            ).scalars()
        )


async def with_payouts(
    tmp_path: Path, wallet: Wallet, keys: Keys, paypal: PayPalSimServer, database_url: str, **overrides: Any
) -> AsyncIterator[tuple[Payouts, object]]:
    settings = payouts_settings(
        database_url=database_url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        catalog=write_catalog(tmp_path),
        keys=keys,
        wallet_address=wallet.address,
        paypal_url=paypal.api_url,
        **overrides,
    )
    host, database, channel = await start_service(settings)
    try:
        yield Payouts(pb_grpc.PayoutServiceStub(channel), keys), settings
    finally:
        await channel.close(None)
        await host.stop()  # type: ignore[attr-defined]
        database.close()


async def test_wallet_refusals_reach_the_creator(
    tmp_path: Path, database_url: str, keys: Keys, paypal: PayPalSimServer
) -> None:
    async with running_wallet(database_url, keys, tmp_path) as wallet:
        async for payouts, _settings in with_payouts(tmp_path, wallet, keys, paypal, database_url):
            await payouts.onboard("poor")
            await earn(wallet, "poor", 9_000)
            assert await payouts.refusal("poor", 10_000) == "INSUFFICIENT_DIAMONDS"
            assert await diamonds(wallet, "poor") == (9_000, 0, 9_000)
            assert await payouts.cashouts("poor") == []

            # Restricted: the creator spent coins on a promotion whose purchase was then refunded.
            await payouts.onboard("debtor")
            await earn(wallet, "debtor", 20_000)
            await wallet.credit("debtor", 50, stx="stx-debtor")
            await wallet.stub.SpendCoins(
                wpb.SpendCoinsRequest(request_id="spend-debtor", account_id="debtor", purpose="PROMOTE", coins=50),
                metadata=wallet.md(),
            )
            await refund(wallet, "stx-debtor")
            assert (await wallet.balance("debtor")).restricted
            assert await payouts.refusal("debtor", 10_000) == "ACCOUNT_RESTRICTED"
            assert await diamonds(wallet, "debtor") == (20_000, 0, 20_000)
            assert await payouts.cashouts("debtor") == []

            # Diamond debt: gifts already cashed out were paid with coins that were refunded.
            await payouts.onboard("owing")
            fan_purchase = await wallet.credit("fan-owing", 10_000, stx="stx-owing")
            assert fan_purchase.state == wpb.CREDIT_STATE_CREDITED
            await wallet.gift("fan-owing", "owing", "rose", count=10_000)
            await earn(wallet, "owing", 10_000)
            await wallet.stub.ReserveDiamonds(
                wpb.ReserveDiamondsRequest(
                    request_id="hold-owing", account_id="owing", diamonds=20_000, reservation_id="hold-owing"
                ),
                metadata=wallet.md(),
            )
            await wallet.stub.CommitReservation(
                wpb.CommitReservationRequest(request_id="commit-owing", reservation_id="hold-owing"),
                metadata=wallet.md(),
            )
            await refund(wallet, "stx-owing")
            await earn(wallet, "owing", 12_000)  # 10,000 of it repay the debt first
            assert await payouts.refusal("owing", 10_000) == "INSUFFICIENT_DIAMONDS"
            assert (await wallet.balance("owing")).diamond_debt == 0

            # Sandbox diamonds are never withdrawable.
            await payouts.onboard("tested")
            await wallet.credit("tester", 20_000, stx="stx-sandbox", environment=wpb.STORE_ENVIRONMENT_SANDBOX)
            await wallet.gift("tester", "tested", "rose", count=20_000)
            assert await payouts.refusal("tested", 10_000) == "SANDBOX_NOT_WITHDRAWABLE"
            assert await payouts.cashouts("tested") == []


async def test_immature_diamonds_cannot_be_cashed_out(
    tmp_path: Path, database_url: str, keys: Keys, paypal: PayPalSimServer
) -> None:
    async with running_wallet(database_url, keys, tmp_path, holding_days=30) as wallet:
        async for payouts, _settings in with_payouts(tmp_path, wallet, keys, paypal, database_url):
            await payouts.onboard("fresh")
            await earn(wallet, "fresh", 20_000)
            assert await payouts.refusal("fresh", 10_000) == "DIAMONDS_NOT_MATURE"
            assert await diamonds(wallet, "fresh") == (20_000, 0, 0)
            assert await payouts.cashouts("fresh") == []


SETTLE_KILL = "payouts.settle.after_wallet"


@pytest.mark.slow
async def test_batch_against_the_real_wallet_keeps_the_ledger_clean(
    tmp_path: Path, database_url: str, keys: Keys, paypal: PayPalSimServer
) -> None:
    paypal.faults(final_delay_seconds=0.5, receiver_outcomes={"bounce@example.com": "RETURNED"})
    async with running_wallet(database_url, keys, tmp_path) as wallet:
        # A short stuck time: the sweeper re-sends the settlement the killed worker never recorded.
        async for payouts, settings in with_payouts(
            tmp_path, wallet, keys, paypal, database_url, payout_stuck_seconds=3.0
        ):
            creators = [f"star-{i}" for i in range(6)]
            cashouts = {}
            for i, creator in enumerate(creators):
                await earn(wallet, creator, 25_000)
                await payouts.onboard(creator, "bounce@example.com" if i == 3 else "")
                cashouts[creator] = (await payouts.request(creator, 20_001)).cashout_id
            for creator in creators:
                assert await diamonds(wallet, creator) == (25_000, 20_000, 5_000)
            points = tmp_path / "failpoints"
            armed = failpoint_env(points, f"{SETTLE_KILL}=kill-group")
            worker = Worker(settings, tmp_path / "worker-0", env=armed).start()  # type: ignore[arg-type]
            workers = [worker]
            try:
                created = await payouts.stub.CreatePayoutBatch(
                    pb.CreatePayoutBatchRequest(request_id="real"), metadata=keys.metadata("payouts:ops")
                )
                batch_id = created.batch.batch_id
                # Killed after the wallet settled a submission and before payouts recorded it.
                assert await exit_status(worker) == -signal.SIGKILL, worker.output()
                assert fired_pid(points, SETTLE_KILL) is not None
                assert committed_in_wallet(wallet), "the wallet had committed before the kill"
                workers.append(Worker(settings, tmp_path / "worker-1", env=armed).start())  # type: ignore[arg-type]

                deadline = time.monotonic() + 90
                while True:
                    reply = await payouts.stub.GetPayoutBatch(
                        pb.GetPayoutBatchRequest(batch_id=batch_id), metadata=keys.metadata("payouts:ops")
                    )
                    if reply.batch.state == pb.BATCH_STATE_COMPLETED:
                        break
                    assert time.monotonic() < deadline, workers[-1].output()
                    await asyncio.sleep(0.3)
            finally:
                for running in workers:
                    running.kill()
            for i, creator in enumerate(creators):
                (cashout,) = await payouts.cashouts(creator)
                if i == 3:
                    # Returned by PayPal: the diamonds are the creator's again.
                    assert cashout.state == pb.CASHOUT_STATE_FAILED
                    assert await diamonds(wallet, creator) == (25_000, 0, 25_000)
                else:
                    # Paid: 20,000 diamonds left for $100.00; the odd diamond stayed.
                    assert cashout.state == pb.CASHOUT_STATE_PAID
                    assert await diamonds(wallet, creator) == (5_000, 0, 5_000)
            # One ledger transaction per settled reservation, though one settlement was sent twice.
            posted, clearing = ledger(wallet)
            commit, release = Kind.RESERVATION_COMMIT.value, Kind.RESERVATION_RELEASE.value
            assert posted == Counter({(release if i == 3 else commit, cashouts[c]): 1 for i, c in enumerate(creators)})
            assert clearing == 5 * 20_000
            assert audit(wallet.database) == []
