"""Across services: the App Store simulator, the receipts service and the REAL
wallet service, each on its own port, sharing one database like production."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common.catalog import StoreId
from services.receipts.purchases.model import Refund
from services.wallet.audit import credits_without_evidence
from tests.receipts.support import apple_simulator, ledger, receipts_host, receipts_with_wallet, simulator_settings
from tests.support.databases import on_the_cursor
from tests.support.status import error_reason
from tests.support.tokens import Keys
from tests.wallet.support import running_wallet


async def test_app_store_purchase_credited_once_by_the_real_wallet(
    keys: Keys, database_url: str, tmp_path: Path
) -> None:
    async with (
        apple_simulator(tmp_path) as (store, url),
        running_wallet(database_url, keys, tmp_path) as wallet,
        receipts_host(keys, database_url, tmp_path, wallet.address, simulator_settings(url)) as (components, stub),
    ):
        md = keys.metadata("purchases:verify", subject="app-backend")
        token = components.binding.app_account_token("fan-1")
        _txid, jws = store.buy("com.coinstore.coins.1400", app_account_token=token, quantity=2)

        async def verify(request_id: str, account_id: str = "fan-1") -> pb.VerifyApplePurchaseResponse:
            request = pb.VerifyApplePurchaseRequest(
                request_id=request_id, account_id=account_id, signed_transaction=jws
            )
            return await stub.VerifyApplePurchase(request, metadata=md, timeout=30)

        replies = await asyncio.gather(*(verify(f"r-{i}") for i in range(20)))
        states = [r.purchases[0].state for r in replies]
        assert states.count(pb.PURCHASE_STATE_CREDITED) == 1
        assert states.count(pb.PURCHASE_STATE_ALREADY_CREDITED) == 19
        assert (await wallet.balance("fan-1")).coins == 2800
        txid = replies[0].purchases[0].store_transaction_id
        assert await ledger(wallet, "fan-1") == [(txid, 2800)]
        # The wallet keeps the hash of the signed transaction the credit rests on, and who credited it.
        purchase = await wallet.stub.GetPurchaseConsumption(
            wpb.GetPurchaseConsumptionRequest(
                store=wpb.STORE_APP_STORE, environment=wpb.STORE_ENVIRONMENT_PRODUCTION, store_transaction_id=txid
            ),
            metadata=wallet.md(),
        )
        assert purchase.evidence_sha256 == hashlib.sha256(jws.encode()).hexdigest()
        assert purchase.credited_by.subject == "receipts"

        # Another account: refused before the wallet, and nothing moves.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await verify("r-other", "fan-2")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(caught.value) == "ACCOUNT_MISMATCH"
        assert (await wallet.balance("fan-2")).coins == 0
        assert (await wallet.balance("fan-1")).coins == 2800

        # Refund of one of the two packs (state-based: reported twice, moved once), then reversed.
        crediting = components.crediting
        one_pack = Refund(StoreId.APP_STORE, txid, None, full=False, refunded_quantity=1)
        first = await crediting.reverse(one_pack, request_id="n-1")
        again = await crediting.reverse(one_pack, request_id="n-2")
        assert (first.coins_moved, again.coins_moved) == (1400, 0)
        assert (await wallet.balance("fan-1")).coins == 1400
        restored = await crediting.restore(StoreId.APP_STORE, txid, request_id="n-3")
        assert restored.coins_moved == 1400
        assert (await wallet.balance("fan-1")).coins == 2800


async def test_a_legacy_receipt_verified_twice_credits_each_consumable_once(
    keys: Keys, database_url: str, tmp_path: Path
) -> None:
    async with (
        apple_simulator(tmp_path) as (store, url),
        receipts_with_wallet(keys, database_url, tmp_path, simulator_settings(url)) as receipts,
    ):
        ids = [store.buy("com.coinstore.coins.70", customer="fan", environment="Production")[0] for _ in range(3)]
        receipt = store.app_receipt(ids[:1])
        for request_id in ("r-1", "r-2"):
            request = pb.VerifyApplePurchaseRequest(request_id=request_id, account_id="fan-1", app_receipt=receipt)
            await receipts.stub.VerifyApplePurchase(request, metadata=receipts.md(), timeout=30)
        assert sorted(await receipts.ledger("fan-1")) == sorted((txid, 70) for txid in ids)
        # Each credit rests on the App Store's signed answer for its transaction.
        assert credits_without_evidence(receipts.wallet.database) == (0, [])


@pytest.mark.postgres
async def test_an_app_store_purchase_runs_past_sqlalchemy(
    keys: Keys, postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both services' batch statements of the purchase path run on the psycopg cursor
    (services.common.bulk): one that needs SQLAlchemy's execution layer costs twice the CPU."""
    with on_the_cursor(caplog):
        async with (
            apple_simulator(tmp_path) as (store, url),
            running_wallet(postgres_url, keys, tmp_path) as wallet,
            receipts_host(keys, postgres_url, tmp_path, wallet.address, simulator_settings(url)) as (components, stub),
        ):
            md = keys.metadata("purchases:verify", subject="app-backend")
            _txid, jws = store.buy(
                "com.coinstore.coins.70", app_account_token=components.binding.app_account_token("fan")
            )
            request = pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan", signed_transaction=jws)
            reply = await stub.VerifyApplePurchase(request, metadata=md, timeout=30)
            assert reply.purchases[0].state == pb.PURCHASE_STATE_CREDITED
