"""Payouts against the real wallet service: its refusals reach the creator with the same
reasons, and a batch run by a real worker debits paid diamonds, returns failed ones and
leaves the wallet's ledger audit clean."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.wallet.store import audit
from tests.payouts.conftest import start_service
from tests.payouts.harness import PayPalSimServer, Worker, payouts_settings, write_catalog
from tests.payouts.test_service import details
from tests.support.tokens import Keys
from tests.wallet.support import Wallet, running_wallet

pytestmark = pytest.mark.timeout(240)


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
            pb.VerifyPayoutDestinationRequest(request_id=f"v-{creator}", creator_account_id=creator),
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


async def with_payouts(
    tmp_path: Path, wallet: Wallet, keys: Keys, paypal: PayPalSimServer, database_url: str
) -> AsyncIterator[tuple[Payouts, object]]:
    settings = payouts_settings(
        database_url=database_url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        catalog=write_catalog(tmp_path),
        keys=keys,
        wallet_address=wallet.address,
        paypal_url=paypal.api_url,
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

            # Restricted: the creator spent coins whose purchase was then refunded.
            await payouts.onboard("debtor")
            await earn(wallet, "debtor", 20_000)
            await wallet.credit("debtor", 50, stx="stx-debtor")
            await wallet.gift("debtor", "someone", "rose", count=50)
            await wallet.stub.ReversePurchase(
                wpb.ReversePurchaseRequest(
                    request_id="rev-debtor", store=wpb.STORE_APP_STORE, store_transaction_id="stx-debtor"
                ),
                metadata=wallet.md(),
            )
            assert (await wallet.balance("debtor")).restricted
            assert await payouts.refusal("debtor", 10_000) == "ACCOUNT_RESTRICTED"
            assert (await wallet.balance("debtor")).diamonds_reserved == 0


async def test_immature_diamonds_cannot_be_cashed_out(
    tmp_path: Path, database_url: str, keys: Keys, paypal: PayPalSimServer
) -> None:
    async with running_wallet(database_url, keys, tmp_path, holding_days=30) as wallet:
        async for payouts, _settings in with_payouts(tmp_path, wallet, keys, paypal, database_url):
            await payouts.onboard("fresh")
            await earn(wallet, "fresh", 20_000)
            assert await payouts.refusal("fresh", 10_000) == "DIAMONDS_NOT_MATURE"


@pytest.mark.slow
async def test_batch_against_the_real_wallet_keeps_the_ledger_clean(
    tmp_path: Path, database_url: str, keys: Keys, paypal: PayPalSimServer
) -> None:
    paypal.faults(final_delay_seconds=0.5, receiver_outcomes={"bounce@example.com": "RETURNED"})
    async with running_wallet(database_url, keys, tmp_path) as wallet:
        async for payouts, settings in with_payouts(tmp_path, wallet, keys, paypal, database_url):
            creators = [f"star-{i}" for i in range(6)]
            for i, creator in enumerate(creators):
                await earn(wallet, creator, 25_000)
                await payouts.onboard(creator, "bounce@example.com" if i == 3 else "")
                await payouts.request(creator, 20_001)
            for creator in creators:
                balance = await wallet.balance(creator)
                assert (balance.diamonds, balance.diamonds_reserved, balance.diamonds_withdrawable) == (
                    25_000,
                    20_000,
                    5_000,
                )
            worker = Worker(settings, tmp_path / "worker").start()  # type: ignore[arg-type]
            try:
                created = await payouts.stub.CreatePayoutBatch(
                    pb.CreatePayoutBatchRequest(request_id="real"), metadata=keys.metadata("payouts:ops")
                )
                batch_id = created.batch.batch_id

                deadline = time.monotonic() + 90
                while True:
                    reply = await payouts.stub.GetPayoutBatch(
                        pb.GetPayoutBatchRequest(batch_id=batch_id), metadata=keys.metadata("payouts:ops")
                    )
                    if reply.batch.state == pb.BATCH_STATE_COMPLETED:
                        break
                    assert time.monotonic() < deadline, worker.output()
                    await asyncio.sleep(0.3)
            finally:
                worker.stop()
            for i, creator in enumerate(creators):
                balance = await wallet.balance(creator)
                if i == 3:
                    # Returned by PayPal: the diamonds are the creator's again.
                    assert (balance.diamonds, balance.diamonds_reserved) == (25_000, 0)
                else:
                    # Paid: 20,000 diamonds left for $100.00; the odd diamond stayed.
                    assert (balance.diamonds, balance.diamonds_reserved) == (5_000, 0)
            assert audit(wallet.database) == []
