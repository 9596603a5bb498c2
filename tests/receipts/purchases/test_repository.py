"""SQL of the purchases core (purchases/repository.py) on each backend."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from services.common.catalog import StoreId
from services.common.errors import DomainError
from services.receipts.purchases.model import Environment, Refund
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


async def test_refund_reports_merge_cumulatively(receipts: Receipts) -> None:
    """Reports may arrive late or out of order: the recorded refund only grows, a full one
    stays full, and the environment first named stays."""
    refunds = receipts.components.crediting.refunds
    now = datetime.now(UTC)

    def report(full: bool, quantity: int, milli: int, environment: Environment | None) -> Refund:
        return Refund(StoreId.APP_STORE, "tx-merge", environment, full, quantity, milli, "reason")

    first = await refunds.record(report(False, 2, 0, Environment.PRODUCTION), now)
    assert (first.full, first.refunded_quantity, first.environment) == (False, 2, Environment.PRODUCTION)
    older = await refunds.record(report(False, 1, 50_000, None), now)
    assert (older.full, older.refunded_quantity, older.refunded_percentage_milli) == (False, 2, 50_000)
    full = await refunds.record(report(True, 0, 0, Environment.SANDBOX), now)
    assert (full.full, full.refunded_quantity, full.refunded_percentage_milli) == (True, 2, 50_000)
    assert full.environment is Environment.PRODUCTION
    late = await refunds.record(report(False, 1, 0, None), now)
    assert (late.full, late.refunded_quantity) == (True, 2)
