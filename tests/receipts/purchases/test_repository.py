"""SQL of the purchases core (purchases/repository.py) on each backend."""

from __future__ import annotations

import asyncio

import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from services.common.errors import DomainError
from tests.receipts.support import Receipts


async def test_request_log_claims_once_under_concurrency(receipts: Receipts) -> None:
    purchases = receipts.components.purchases
    request = pb.GetPurchaseRequest(store_transaction_id="x")
    results = await asyncio.gather(
        *(purchases.remember("M", "same-id", request, pb.GetPurchaseResponse()) for _ in range(6))
    )
    assert sum(r is None for r in results) == 1
    other = pb.GetPurchaseRequest(store_transaction_id="y")
    with pytest.raises(DomainError) as caught:
        await purchases.remember("M", "same-id", other, pb.GetPurchaseResponse())
    assert caught.value.reason == "REQUEST_ID_REUSED"
