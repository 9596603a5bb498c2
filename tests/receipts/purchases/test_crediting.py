"""The one crediting path (purchases/crediting.py) through real sockets. What is
credited, and how often, is read from the real wallet's ledger; what the
receipts service asks the wallet (and when it must not ask at all) from a fake
wallet that records every call."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common.catalog import Price, StoreId
from services.common.errors import DomainError
from services.receipts.purchases.model import Claim, Environment, Outcome, Refund, StoredState, VerifiedPurchase
from tests.receipts.support import Receipts, WalletReceipts, receipts_service
from tests.support.tokens import Keys

PACK = "com.coinstore.coins.350"


def purchase(txid: str, **changes: object) -> VerifiedPurchase:
    values: dict[str, object] = {
        "store": StoreId.APP_STORE,
        "store_transaction_id": txid,
        "product_id": PACK,
        "quantity": 1,
        "environment": Environment.PRODUCTION,
        "storefront": "USA",
        "price": Price(649, "USD"),
        "purchase_time": datetime(2026, 11, 20, 12, 0, tzinfo=UTC),
    }
    values.update(changes)
    return VerifiedPurchase(**values)  # type: ignore[arg-type]


async def test_credit_once_then_already_credited(real: WalletReceipts) -> None:
    crediting = real.components.crediting
    first = await crediting.credit(purchase("t-1", quantity=3), Claim("fan-1", "r-1"))
    assert first.outcome is Outcome.CREDITED
    assert first.coins_credited == 3 * 350
    assert first.new_balance == 1050
    again = await crediting.credit(purchase("t-1", quantity=3), Claim("fan-1", "r-2"))
    assert again.outcome is Outcome.ALREADY_CREDITED
    assert again.new_balance == 1050
    assert await real.ledger("fan-1") == [("t-1", 1050)]

    reply = await real.stub.GetPurchase(
        pb.GetPurchaseRequest(store=pb.STORE_APP_STORE, store_transaction_id="t-1"), metadata=real.md(), timeout=10
    )
    assert reply.purchase.state == pb.PURCHASE_STATE_CREDITED
    assert reply.purchase.account_id == "fan-1"
    assert reply.purchase.coins_credited == 1050


async def test_the_wallet_is_asked_with_the_terms_of_the_first_claim(receipts: Receipts) -> None:
    crediting = receipts.components.crediting
    await crediting.credit(purchase("t-1", quantity=3), Claim("fan-1", "r-1"))
    # The wallet saw the terms of the first claim, with the receipts service's own token.
    credit = receipts.wallet.only_credit("t-1")
    assert (credit.store, credit.account_id, credit.coins, credit.quantity) == (wpb.STORE_APP_STORE, "fan-1", 1050, 3)
    assert credit.price.amount_minor == 649
    assert credit.environment == wpb.STORE_ENVIRONMENT_PRODUCTION
    # A later report of the same transaction asks again, under the same key and for the stored coins.
    await crediting.credit(purchase("t-1", quantity=1, storefront="DEU"), Claim("fan-1", "r-2"))
    assert [(c.store, c.store_transaction_id, c.coins) for c in receipts.wallet.credits] == [
        (wpb.STORE_APP_STORE, "t-1", 1050)
    ] * 2


async def test_same_transaction_twenty_times_concurrently_credits_once(real: WalletReceipts) -> None:
    crediting = real.components.crediting
    results = await asyncio.gather(*(crediting.credit(purchase("t-many"), Claim("fan-1", f"r-{i}")) for i in range(20)))
    outcomes = [r.outcome for r in results]
    assert outcomes.count(Outcome.CREDITED) == 1
    assert outcomes.count(Outcome.ALREADY_CREDITED) == 19
    assert await real.ledger("fan-1") == [("t-many", 350)]
    assert await real.balance("fan-1") == 350


async def test_second_account_is_refused_and_nothing_moves(receipts: Receipts) -> None:
    crediting = receipts.components.crediting
    await crediting.credit(purchase("t-2"), Claim("fan-1", "r-1"))
    calls = len(receipts.wallet.calls)
    with pytest.raises(DomainError) as caught:
        await crediting.credit(purchase("t-2"), Claim("fan-2", "r-2"))
    assert caught.value.reason == "RECEIPT_BOUND_TO_OTHER_ACCOUNT"
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert len(receipts.wallet.calls) == calls
    assert receipts.wallet.only_credit("t-2").account_id == "fan-1"


async def test_recorded_purchase_belongs_to_first_claimer(receipts: Receipts) -> None:
    crediting = receipts.components.crediting
    record = await crediting.record(purchase("t-3"))
    assert record.account_id is None
    assert receipts.wallet.calls == []
    result = await crediting.credit(purchase("t-3"), Claim("fan-9", "r-1"))
    assert result.outcome is Outcome.CREDITED
    assert result.record.account_id == "fan-9"


async def test_a_purchase_refunded_in_full_before_it_is_recorded_is_recorded_revoked(receipts: Receipts) -> None:
    crediting = receipts.components.crediting
    await crediting.apply_refund(Refund(StoreId.APP_STORE, "t-14", None, full=True), request_id="refund-1")

    record = await crediting.record(purchase("t-14"))

    assert record.state is StoredState.REVOKED
    assert receipts.wallet.credits == []


async def test_revoked_purchase_credits_nothing(receipts: Receipts) -> None:
    result = await receipts.components.crediting.credit(purchase("t-4", revoked=True), Claim("fan-1", "r-1"))
    assert result.outcome is Outcome.REVOKED
    assert result.coins_credited == 0
    assert receipts.wallet.calls == []


async def test_unknown_product_and_bad_region(receipts: Receipts) -> None:
    crediting = receipts.components.crediting
    with pytest.raises(DomainError) as caught:
        await crediting.credit(purchase("t-5", product_id="coins_70"), Claim("fan-1", "r-1"))
    assert caught.value.reason == "UNKNOWN_PRODUCT"
    with pytest.raises(DomainError) as caught:
        await crediting.credit(purchase("t-5"), Claim("fan-1", "r-1", "USA"))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert receipts.wallet.calls == []


async def test_region_policy_flag_marks_purchase(receipts: Receipts) -> None:
    # The default policy is flag: credited, and marked for review.
    result = await receipts.components.crediting.credit(purchase("t-6", storefront="TUR"), Claim("fan-1", "r-1", "DE"))
    assert result.outcome is Outcome.CREDITED
    assert result.record.flagged_for_review
    assert receipts.wallet.only_credit("t-6").flagged_for_review
    same = await receipts.components.crediting.credit(purchase("t-7", storefront="DEU"), Claim("fan-1", "r-2", "DE"))
    assert not same.record.flagged_for_review


async def test_region_policy_refuse(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with receipts_service(keys, database_url, tmp_path, {"REGION_POLICY": "refuse"}) as receipts:
        with pytest.raises(DomainError) as caught:
            await receipts.components.crediting.credit(purchase("t-8", storefront="TUR"), Claim("fan-1", "r-1", "DE"))
        assert caught.value.reason == "REGION_MISMATCH"
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert receipts.wallet.calls == []


async def test_promotion_bonus_at_purchase_time(receipts: Receipts) -> None:
    in_window = datetime(2026, 12, 10, tzinfo=UTC)
    result = await receipts.components.crediting.credit(
        purchase("t-9", product_id="com.coinstore.coins.1400", quantity=2, purchase_time=in_window),
        Claim("fan-1", "r-1"),
    )
    assert result.bonus_coins == 280
    assert result.coins_credited == 2 * 1400 + 280
    request = receipts.wallet.only_credit("t-9")
    assert (request.coins, request.bonus_coins) == (3080, 280)


async def test_wallet_down_is_unavailable_not_internal(receipts: Receipts) -> None:
    receipts.wallet.down = True
    with pytest.raises(DomainError) as caught:
        await receipts.components.crediting.credit(purchase("t-10"), Claim("fan-1", "r-1"))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "WALLET_UNAVAILABLE"
    receipts.wallet.down = False
    # The purchase stayed bound and is credited on the retry.
    result = await receipts.components.crediting.credit(purchase("t-10"), Claim("fan-1", "r-1"))
    assert result.outcome is Outcome.CREDITED


async def test_reverse_is_cumulative_and_restore(real: WalletReceipts) -> None:
    crediting = real.components.crediting
    await crediting.credit(purchase("t-11", quantity=4), Claim("fan-1", "r-1"))
    one_pack = Refund(StoreId.APP_STORE, "t-11", None, full=False, refunded_quantity=1)
    first = await crediting.reverse(one_pack, request_id="n-1")
    assert (first.applied, first.coins_moved, first.new_balance) == (True, 350, 1050)
    repeat = await crediting.reverse(one_pack, request_id="n-2")
    assert (repeat.applied, repeat.coins_moved) == (False, 0)
    assert repeat.record is not None
    assert repeat.record.refunded_quantity == 1
    assert repeat.record.state.value == "refunded"
    restored = await crediting.restore(StoreId.APP_STORE, "t-11", request_id="n-3")
    assert restored.coins_moved == 350
    assert restored.record is not None
    assert restored.record.state.value == "credited"
    assert await real.ledger("fan-1") == [("t-11", 1400), ("t-11", -350), ("t-11", 350)]


async def test_pending_purchase_credited_once_payment_completes(receipts: Receipts) -> None:
    crediting = receipts.components.crediting
    pending = await crediting.credit(purchase("t-12", pending=True), Claim("fan-1", "r-1"))
    assert pending.outcome is Outcome.PENDING
    assert receipts.wallet.calls == []
    done = await crediting.credit(purchase("t-12"), Claim("fan-1", "r-2"))
    assert done.outcome is Outcome.CREDITED
    assert done.record.state.value == "credited"


async def test_notification_recorded_purchase_flagged_by_its_claimer_region(receipts: Receipts) -> None:
    crediting = receipts.components.crediting
    await crediting.record(purchase("t-13", storefront="TUR"))
    result = await crediting.credit(purchase("t-13", storefront="TUR"), Claim("fan-1", "r-1", "DE"))
    assert result.outcome is Outcome.CREDITED
    assert result.record.flagged_for_review
    assert receipts.wallet.only_credit("t-13").flagged_for_review
