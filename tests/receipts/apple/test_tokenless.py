"""Token-less App Store purchases follow COINSTORE_APPLE_TOKENLESS_PURCHASES: under
require-token a purchase without appAccountToken (and so every legacy-receipt
purchase) is refused with APP_ACCOUNT_TOKEN_REQUIRED and nothing is credited; under
first-claimer (the default) the first account to verify it owns it. Through the
real receipts gRPC service, the App Store simulator and the real wallet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from services.storesim.apple import AppleStore
from tests.receipts.support import apple_simulator, ledger, receipts_host, simulator_settings
from tests.support.status import error_reason
from tests.support.tokens import Keys
from tests.wallet.support import running_wallet

PACK = "com.coinstore.coins.70"


@pytest.mark.parametrize("policy", ["require-token", "first-claimer"])
async def test_tokenless_purchases_follow_the_policy(
    keys: Keys, database_url: str, tmp_path: Path, policy: str
) -> None:
    async with apple_simulator(tmp_path) as (store, url):
        settings = {**simulator_settings(url), "APPLE_TOKENLESS_PURCHASES": policy}
        await _check(keys, database_url, tmp_path, store, settings, policy)


async def _check(
    keys: Keys, database_url: str, tmp_path: Path, store: AppleStore, settings: dict[str, str], policy: str
) -> None:
    async with (
        running_wallet(database_url, keys, tmp_path) as wallet,
        receipts_host(keys, database_url, tmp_path, wallet.address, settings) as (components, stub),
    ):
        md = keys.metadata("purchases:verify", subject="app-backend")
        tokenless, jws = store.buy(PACK)
        legacy = store.app_receipt([store.buy(PACK, customer="fan")[0]])
        with_token, signed = store.buy(PACK, app_account_token=components.binding.app_account_token("fan-1"))

        async def verify(request_id: str, **proof: Any) -> pb.VerifyApplePurchaseResponse:
            request = pb.VerifyApplePurchaseRequest(request_id=request_id, account_id="fan-1", **proof)
            return await stub.VerifyApplePurchase(request, metadata=md, timeout=30)

        await verify("r-token", signed_transaction=signed)
        if policy == "require-token":
            for request_id, proof in (("r-jws", {"signed_transaction": jws}), ("r-legacy", {"app_receipt": legacy})):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await verify(request_id, **proof)
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert error_reason(caught.value) == "APP_ACCOUNT_TOKEN_REQUIRED"
            assert await ledger(wallet, "fan-1") == [(with_token, 70)]
        else:
            await verify("r-jws", signed_transaction=jws)
            await verify("r-legacy", app_receipt=legacy)
            assert len(await ledger(wallet, "fan-1")) == 3
            assert (tokenless, 70) in await ledger(wallet, "fan-1")
