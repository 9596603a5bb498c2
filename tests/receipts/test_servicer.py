"""The receipts gRPC edge (servicer.py) through a real server: GetPurchaseBinding,
GetPurchase and ListProducts, their validation and their scopes."""

from __future__ import annotations

import grpc
import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from tests.receipts.support import Receipts
from tests.support.status import error_reason


async def test_get_purchase_binding_rpc(receipts: Receipts) -> None:
    reply = await receipts.stub.GetPurchaseBinding(
        pb.GetPurchaseBindingRequest(account_id="fan-1"), metadata=receipts.md(), timeout=10
    )
    assert reply.app_account_token == receipts.components.binding.app_account_token("fan-1")
    assert reply.obfuscated_account_id == receipts.components.binding.obfuscated_account_id("fan-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await receipts.stub.GetPurchaseBinding(pb.GetPurchaseBindingRequest(), metadata=receipts.md(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await receipts.stub.GetPurchaseBinding(
            pb.GetPurchaseBindingRequest(account_id="fan-1"), metadata=receipts.md("wallet:read"), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_get_purchase_not_found_and_list_products(receipts: Receipts) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await receipts.stub.GetPurchase(
            pb.GetPurchaseRequest(store=pb.STORE_APP_STORE, store_transaction_id="nope"),
            metadata=receipts.md(),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(caught.value) == "PURCHASE_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await receipts.stub.GetPurchase(
            pb.GetPurchaseRequest(store_transaction_id="x"), metadata=receipts.md(), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    products = await receipts.stub.ListProducts(
        pb.ListProductsRequest(store=pb.STORE_APP_STORE), metadata=receipts.md(), timeout=10
    )
    assert {p.product_id for p in products.products} == {
        "com.coinstore.coins.70",
        "com.coinstore.coins.350",
        "com.coinstore.coins.1400",
        "com.coinstore.coins.7000",
    }
    assert all(p.store == pb.STORE_APP_STORE and p.price.currency_code == "USD" for p in products.products)
    both = await receipts.stub.ListProducts(pb.ListProductsRequest(), metadata=receipts.md(), timeout=10)
    assert len(both.products) == 8
