"""A binding-secret rotation through the real receipts service: purchases bound
under the retired secret still verify for their account (and nobody else's),
new bindings come from the newest secret, and notifications find the account
from either value."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from tests.receipts.support import Receipts, apple_simulator, receipts_service, simulator_settings
from tests.support.status import error_reason
from tests.support.tokens import Keys

PACK = "com.coinstore.coins.350"
OLD, NEW = "the-old-binding-secret-1", "the-new-binding-secret-2"


async def buy(url: str, token: str) -> str:
    async with httpx.AsyncClient() as client:
        reply = await client.post(f"{url}/apple/buy", json={"productId": PACK, "appAccountToken": token}, timeout=5)
    reply.raise_for_status()
    return str(reply.json()["signedTransaction"])


async def binding(receipts: Receipts, account_id: str) -> str:
    reply = await receipts.stub.GetPurchaseBinding(
        pb.GetPurchaseBindingRequest(account_id=account_id), metadata=receipts.md(), timeout=10
    )
    return str(reply.app_account_token)


async def verify(receipts: Receipts, request_id: str, account_id: str, jws: str) -> tuple[grpc.StatusCode, str]:
    """(OK, state name) when verified, else (code, ErrorInfo reason)."""
    try:
        reply = await receipts.stub.VerifyApplePurchase(
            pb.VerifyApplePurchaseRequest(request_id=request_id, account_id=account_id, signed_transaction=jws),
            metadata=receipts.md(),
            timeout=20,
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code(), error_reason(exc)
    return grpc.StatusCode.OK, pb.PurchaseState.Name(reply.purchases[0].state)


CREDITED = (grpc.StatusCode.OK, "PURCHASE_STATE_CREDITED")
MISMATCH = (grpc.StatusCode.PERMISSION_DENIED, "ACCOUNT_MISMATCH")


async def test_retired_secret_keeps_verifying_and_newest_derives(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with apple_simulator(tmp_path) as (_store, url):
        settings = {**simulator_settings(url), "BINDING_SECRET": OLD}
        async with receipts_service(keys, database_url, tmp_path, settings) as receipts:
            old_token = await binding(receipts, "fan-1")
        bought_before = await buy(url, old_token)

        retired_on = datetime.now(UTC).date() - timedelta(days=179)
        rotated = {**settings, "BINDING_SECRET": NEW, "BINDING_RETIRED_SECRETS": f"{retired_on}:{OLD}"}
        async with receipts_service(keys, database_url, tmp_path, rotated) as receipts:
            new_token = await binding(receipts, "fan-1")
            assert new_token != old_token
            bought_after = await buy(url, new_token)
            assert await verify(receipts, "r-x", "fan-2", bought_before) == MISMATCH
            assert await verify(receipts, "r-old", "fan-1", bought_before) == CREDITED
            assert await verify(receipts, "r-new", "fan-1", bought_after) == CREDITED
            # Notifications name only the token: both lead to the account.
            bindings = receipts.components.bindings
            assert bindings.account_for_app_account_token(old_token) == "fan-1"
            assert bindings.account_for_app_account_token(new_token) == "fan-1"

        # Past its keep time the retired secret verifies nothing.
        expired = {**rotated, "BINDING_RETIRED_SECRETS": f"{retired_on - timedelta(days=2)}:{OLD}"}
        async with receipts_service(keys, database_url, tmp_path, expired) as receipts:
            assert await verify(receipts, "r-late", "fan-1", bought_before) == MISMATCH
