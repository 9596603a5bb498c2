"""CreditPurchases through a real server: each item gets what CreditPurchase alone
would answer, keeps its own exactly-once keys, and a bad item spoils no neighbour."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from services.wallet.audit import audit
from tests.support.status import error_info
from tests.wallet.support import Wallet, credit_request, unique


async def credit_many(wallet: Wallet, *requests: pb.CreditPurchaseRequest) -> list[pb.CreditPurchaseResult]:
    reply = await wallet.stub.CreditPurchases(
        pb.CreditPurchasesRequest(requests=requests), metadata=wallet.md("wallet:credit"), timeout=30
    )
    return list(reply.results)


async def single_error(wallet: Wallet, request: pb.CreditPurchaseRequest) -> pb.ItemError:
    """The error CreditPurchase alone raises for ``request``, in the batch's terms."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await wallet.stub.CreditPurchase(request, metadata=wallet.md(), timeout=30)
    info = error_info(caught.value)
    return pb.ItemError(
        code=caught.value.code().value[0],
        message=caught.value.details() or "",
        reason=info.reason,
        metadata=dict(info.metadata),
    )


async def test_each_item_gets_its_own_answer(wallet: Wallet) -> None:
    earlier = await wallet.credit("fan", 100, stx="apple-earlier")
    await wallet.credit("other", 100, stx="apple-theirs")
    reused = credit_request("fan", 100, stx="apple-reused")
    await wallet.stub.CreditPurchase(reused, metadata=wallet.md(), timeout=30)

    fresh = credit_request("fan", 110, bonus=10)
    repeat = credit_request("fan", 100, stx="apple-earlier")
    malformed = credit_request("fan", 0)
    theirs = credit_request("fan", 100, stx="apple-theirs")
    reuse = credit_request("fan", 100, request_id=reused.request_id)
    results = await credit_many(wallet, fresh, repeat, malformed, theirs, reuse)

    assert [r.WhichOneof("result") for r in results] == ["response", "response", "error", "error", "error"]
    credited, again = results[0].response, results[1].response
    assert credited.state == pb.CREDIT_STATE_CREDITED
    assert (credited.coins_credited, credited.bonus_coins) == (110, 10)
    assert again.state == pb.CREDIT_STATE_ALREADY_CREDITED
    assert again.transaction_id == earlier.transaction_id
    # The same answers CreditPurchase gives: a repeated request id replays the batch's answer ...
    replayed = await wallet.stub.CreditPurchase(fresh, metadata=wallet.md(), timeout=30)
    assert replayed == credited
    # ... and each refusal is the status and ErrorInfo the request alone is refused with.
    for request, result in zip((malformed, theirs, reuse), results[2:], strict=True):
        assert result.error == await single_error(wallet, request)
    assert results[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results[2].error.metadata["field"] == "coins"
    assert results[3].error.reason == "RECEIPT_BOUND_TO_OTHER_ACCOUNT"
    assert results[4].error.reason == "REQUEST_ID_REUSED"
    assert (await wallet.balance("fan")).coins == 100 + 100 + 110
    assert audit(wallet.database) == []


async def test_one_purchase_twice_in_a_batch_is_credited_once(wallet: Wallet) -> None:
    first = credit_request("fan", 100, stx="apple-twice")
    second = credit_request("fan", 100, stx="apple-twice")
    results = await credit_many(wallet, first, second)
    states = sorted(r.response.state for r in results)
    assert states == [pb.CREDIT_STATE_CREDITED, pb.CREDIT_STATE_ALREADY_CREDITED]
    assert results[0].response.transaction_id == results[1].response.transaction_id
    assert (await wallet.balance("fan")).coins == 100


async def test_batches_racing_single_calls_credit_each_purchase_once(wallet: Wallet) -> None:
    keys = [unique("stx") for _ in range(40)]
    batches = [credit_many(wallet, *(credit_request("fan", 10, stx=k) for k in keys)) for _ in range(3)]
    singles = [wallet.credit("fan", 10, stx=k) for k in keys]
    batch_answers, single_answers = await asyncio.gather(asyncio.gather(*batches), asyncio.gather(*singles))
    credited = [r for batch in batch_answers for r in batch if r.response.state == pb.CREDIT_STATE_CREDITED]
    credited_alone = [r for r in single_answers if r.state == pb.CREDIT_STATE_CREDITED]
    assert len(credited) + len(credited_alone) == len(keys)
    assert (await wallet.balance("fan")).coins == 10 * len(keys)
    assert audit(wallet.database) == []


@pytest.mark.parametrize("count", [0, 1001])
async def test_batch_size_is_bounded(wallet: Wallet, count: int) -> None:
    requests = [credit_request("fan", 1) for _ in range(count)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await credit_many(wallet, *requests)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "requests"


async def test_batch_needs_the_credit_scope(wallet: Wallet) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await wallet.stub.CreditPurchases(
            pb.CreditPurchasesRequest(requests=[credit_request("fan", 1)]), metadata=wallet.md("wallet:read")
        )
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
