"""ListCreditedPurchases: a store's credited purchases in credit order, paged by the
credit sequence, filtered by credit time, behind its own scope (wallet:purchases)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from tests.support.status import error_reason
from tests.wallet.support import Wallet, unique


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


async def listed(wallet: Wallet, request: pb.ListCreditedPurchasesRequest) -> list[pb.CreditedPurchase]:
    found: list[pb.CreditedPurchase] = []
    while True:
        reply = await wallet.stub.ListCreditedPurchases(request, metadata=wallet.md("wallet:purchases"), timeout=30)
        found.extend(reply.purchases)
        if not reply.next_credit_sequence:
            return found
        request.after_credit_sequence = reply.next_credit_sequence


async def test_credited_purchases_of_a_store_in_credit_order_page_by_page(wallet: Wallet) -> None:
    earlier = unique("gp")
    await wallet.credit(unique("fan"), 70, stx=earlier, store=pb.STORE_GOOGLE_PLAY)
    wallet.clock.advance(timedelta(minutes=1))
    start = wallet.clock.now() - timedelta(seconds=1)
    play = [unique("gp") for _ in range(5)]
    for token in play:
        await wallet.credit(unique("fan"), 70, stx=token, store=pb.STORE_GOOGLE_PLAY)
    await wallet.credit(unique("fan"), 70, stx=unique("as"), store=pb.STORE_APP_STORE)
    request = pb.ListCreditedPurchasesRequest(store=pb.STORE_GOOGLE_PLAY, credited_since=stamp(start), page_size=2)
    found = await listed(wallet, request)
    assert [p.store_transaction_id for p in found] == play
    assert {(p.store, p.product_id, p.quantity) for p in found} == {(pb.STORE_GOOGLE_PLAY, "coins_100", 1)}
    sequences = [p.credit_sequence for p in found]
    assert sequences == sorted(sequences)
    assert all(p.credit_time.ToDatetime(tzinfo=UTC) >= start for p in found)
    before = pb.ListCreditedPurchasesRequest(store=pb.STORE_GOOGLE_PLAY, credited_before=stamp(start))
    assert [p.store_transaction_id for p in await listed(wallet, before)] == [earlier]


async def test_it_needs_its_own_scope_and_a_store(wallet: Wallet) -> None:
    request = pb.ListCreditedPurchasesRequest(store=pb.STORE_GOOGLE_PLAY)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await wallet.stub.ListCreditedPurchases(request, metadata=wallet.md("wallet:read", "wallet:credit"), timeout=30)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await wallet.stub.ListCreditedPurchases(
            pb.ListCreditedPurchasesRequest(), metadata=wallet.md("wallet:purchases"), timeout=30
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(invalid.value) == "INVALID_ARGUMENT"
