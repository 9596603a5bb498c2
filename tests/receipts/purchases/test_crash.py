"""Crash safety of crediting with real processes: the receipts service is
killed (SIGKILL, failpoint ``receipts.credit.after_wallet``) after the wallet
credited a purchase and before the purchase row says so. The app's retry on
the restarted service finishes the row, and the real wallet's ledger shows
the credit once."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from coinstore.receipts.v1 import receipt_service_pb2_grpc as pb_grpc
from services.common import migrate
from services.common.catalog import StoreId
from services.common.db import Database
from services.receipts.purchases.model import StoredState
from services.receipts.purchases.repository import PurchaseRepository
from tests.receipts.support import apple_simulator, ledger, simulator_settings
from tests.support.failpoints import failpoint_env, wait_fired
from tests.support.receipts_processes import SERVICE, child, receipts_env
from tests.support.tokens import Keys
from tests.wallet.support import running_wallet

AFTER_WALLET = "receipts.credit.after_wallet"


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_killed_between_the_wallet_credit_and_the_purchase_row(
    keys: Keys, database_url: str, tmp_path: Path
) -> None:
    migrate.upgrade("receipts", database_url)
    failpoints = tmp_path / "failpoints"
    log = tmp_path / "receipts.log"
    async with apple_simulator(tmp_path) as (store, url), running_wallet(database_url, keys, tmp_path) as wallet:
        env = receipts_env(database_url, keys, tmp_path, wallet.port, **simulator_settings(url))
        # Both runs of the service get the failpoint: it fires once, in the first.
        env.update(failpoint_env(failpoints, f"{AFTER_WALLET}=kill"))
        address = f"127.0.0.1:{env['COINSTORE_RECEIPTS_GRPC_PORT']}"
        md = keys.metadata("purchases:verify", subject="app-backend")

        async def call(method: str, request: object) -> object:
            async with grpc.aio.insecure_channel(address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 60)
                stub = pb_grpc.ReceiptServiceStub(channel)
                return await getattr(stub, method)(request, metadata=md, timeout=30)

        with child(SERVICE, env, tmp_path, log) as receipts:
            binding = await call("GetPurchaseBinding", pb.GetPurchaseBindingRequest(account_id="fan-1"))
            txid, jws = store.buy("com.coinstore.coins.350", app_account_token=binding.app_account_token)  # type: ignore[attr-defined]
            verify = pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", signed_transaction=jws)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call("VerifyApplePurchase", verify)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, log.read_text()[-3000:]
            assert wait_fired(failpoints, AFTER_WALLET, 30) == receipts.pid
            assert receipts.wait(30) == -signal.SIGKILL

        # The wallet credited; the receipts database does not know it.
        assert await ledger(wallet, "fan-1") == [(txid, 350)]
        database = Database.from_url(database_url, 2)
        try:
            purchases = PurchaseRepository(database)
            # A first report writes its purchase row only with the credit's outcome: none yet.
            assert await purchases.get(StoreId.APP_STORE, txid) is None

            with child(SERVICE, env, tmp_path, log):
                # The app got no answer and retries the same request.
                reply = await call("VerifyApplePurchase", verify)
            # The same request: the wallet replays its original answer, and no coins move again.
            (purchase,) = reply.purchases  # type: ignore[attr-defined]
            assert (purchase.state, purchase.new_balance) == (pb.PURCHASE_STATE_CREDITED, 350)
            after = await purchases.get(StoreId.APP_STORE, txid)
            assert after is not None
            assert (after.state, after.account_id) == (StoredState.CREDITED, "fan-1")
            assert after.wallet_transaction_id
        finally:
            database.close()
        assert await ledger(wallet, "fan-1") == [(txid, 350)]
