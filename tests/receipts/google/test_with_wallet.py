"""Across services: the Play simulator, the receipts service and the REAL
wallet service, each on its own port, sharing one database like production.
What is credited, and how often, is read from the wallet's ledger."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from services.common.catalog import StoreId
from services.receipts.purchases.model import Refund
from tests.receipts.google.support import PACKAGE, google_settings, play_simulator
from tests.receipts.support import receipts_with_wallet
from tests.support.databases import on_the_cursor
from tests.support.status import error_reason
from tests.support.tokens import Keys


async def test_play_purchase_credited_once_by_the_real_wallet(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with (
        play_simulator(tmp_path) as (play, base),
        receipts_with_wallet(keys, database_url, tmp_path, google_settings(play, base, tmp_path)) as receipts,
    ):
        obfuscated = receipts.components.binding.obfuscated_account_id("fan-1")
        token = play.buy("coins_1400", account_id=obfuscated, quantity=2).token

        async def verify(request_id: str, account_id: str = "fan-1") -> pb.PurchaseResult:
            request = pb.VerifyGooglePurchaseRequest(
                request_id=request_id, account_id=account_id, product_id="coins_1400", purchase_token=token
            )
            reply = await receipts.stub.VerifyGooglePurchase(request, metadata=receipts.md(), timeout=30)
            return reply.purchase

        states = [r.state for r in await asyncio.gather(*(verify(f"r-{i}") for i in range(20)))]
        assert states.count(pb.PURCHASE_STATE_CREDITED) == 1
        assert states.count(pb.PURCHASE_STATE_ALREADY_CREDITED) == 19
        assert await receipts.ledger("fan-1") == [(token, 2800)]

        # Another account: refused before the wallet (the purchase names fan-1), and nothing moves.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await verify("r-other", "fan-2")
        assert (caught.value.code(), error_reason(caught.value)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "ACCOUNT_MISMATCH",
        )
        assert await receipts.ledger("fan-2") == []

        # Consumed at Google since: reported again, still credited once.
        play.consume(PACKAGE, "coins_1400", token)
        assert (await verify("r-late")).state == pb.PURCHASE_STATE_ALREADY_CREDITED
        assert await receipts.ledger("fan-1") == [(token, 2800)]

        # Google voids one of the two packs, and says so twice: the coins of one pack go back, once.
        crediting = receipts.components.crediting
        one_pack = Refund(StoreId.GOOGLE_PLAY, token, None, full=False, refunded_quantity=1)
        first = await crediting.reverse(one_pack, request_id="v-1")
        again = await crediting.reverse(one_pack, request_id="v-2")
        assert (first.coins_moved, again.coins_moved) == (1400, 0)
        assert await receipts.ledger("fan-1") == [(token, 2800), (token, -1400)]
        assert await receipts.balance("fan-1") == 1400


@pytest.mark.postgres
async def test_a_play_purchase_runs_past_sqlalchemy(
    keys: Keys, postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As the App Store's: every batch statement of the purchase path on the psycopg cursor."""
    with on_the_cursor(caplog):
        async with (
            play_simulator(tmp_path) as (play, base),
            receipts_with_wallet(keys, postgres_url, tmp_path, google_settings(play, base, tmp_path)) as receipts,
        ):
            obfuscated = receipts.components.binding.obfuscated_account_id("fan")
            token = play.buy("coins_70", account_id=obfuscated).token
            request = pb.VerifyGooglePurchaseRequest(
                request_id="r-1", account_id="fan", product_id="coins_70", purchase_token=token
            )
            reply = await receipts.stub.VerifyGooglePurchase(request, metadata=receipts.md(), timeout=30)
            assert reply.purchase.state == pb.PURCHASE_STATE_CREDITED
