"""VerifyGooglePurchase through a real receipts gRPC server, the real Android
Publisher client (bundled discovery document, service-account JWT-bearer flow)
and the Play simulator on real sockets."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import grpc
import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common.catalog import StoreId
from services.receipts.google.repository import ConsumeState
from services.receipts.purchases.model import evidence_hash
from services.storesim.google import Fault, PlayState
from tests.receipts.google.support import PACKAGE, google_receipts
from tests.receipts.support import Receipts
from tests.support.status import error_reason
from tests.support.tokens import Keys


def binding(receipts: Receipts, account_id: str) -> str:
    return receipts.components.binding.obfuscated_account_id(account_id)


async def verify(
    receipts: Receipts,
    token: str,
    *,
    account_id: str = "fan-1",
    product_id: str = "coins_70",
    request_id: str | None = None,
    package_name: str = "",
    account_region: str = "",
) -> pb.PurchaseResult:
    request = pb.VerifyGooglePurchaseRequest(
        request_id=request_id or f"r-{account_id}-{zlib.crc32(token.encode())}-{product_id}",
        account_id=account_id,
        product_id=product_id,
        purchase_token=token,
        package_name=package_name,
        account_region=account_region,
    )
    reply = await receipts.stub.VerifyGooglePurchase(request, metadata=receipts.md(), timeout=30)
    return reply.purchase


async def refused(receipts: Receipts, token: str, **kwargs: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await verify(receipts, token, **kwargs)
    return caught.value.code(), error_reason(caught.value)


def wallet_credits(receipts: Receipts) -> list[tuple[str, str, int]]:
    """Every Google Play CreditPurchase the (fake) wallet received: (account, token, coins)."""
    return [
        (c.account_id, c.store_transaction_id, c.coins)
        for c in receipts.wallet.credits
        if c.store == wpb.STORE_GOOGLE_PLAY
    ]


async def test_purchased_is_credited_then_queued_for_consumption_not_consumed_inline(
    keys: Keys, database_url: str, tmp_path: Path
) -> None:
    async with google_receipts(keys, database_url, tmp_path) as (receipts, play):
        queued: list[str] = []
        receipts.components.google.enqueue_consume = queued.append  # the Celery sender, observed
        bought = play.buy("coins_350", account_id=binding(receipts, "fan-1"), region_code="US")
        result = await verify(receipts, bought.token, product_id="coins_350", account_region="US")
        assert result.state == pb.PURCHASE_STATE_CREDITED
        assert queued == [bought.token]
        assert (result.store, result.store_transaction_id) == (pb.STORE_GOOGLE_PLAY, bought.token)
        assert (result.coins_credited, result.quantity, result.new_balance) == (350, 1, 350)
        assert result.environment == pb.STORE_ENVIRONMENT_PRODUCTION
        assert (result.storefront, result.order_id) == ("US", bought.order_id)
        assert not result.flagged_for_review
        assert wallet_credits(receipts) == [("fan-1", bought.token, 350)]
        # Consumption is the worker's job, after the commit: nothing consumed inline.
        assert not play.get(bought.token).consumed  # type: ignore[union-attr]
        google = receipts.components.google
        row = await receipts.components.database.run(google.consumptions.get, bought.token)
        assert row is not None
        assert (row.state, row.product_id, row.package_name) == (ConsumeState.UNCONSUMED, "coins_350", PACKAGE)
        record = await receipts.components.purchases.get(StoreId.GOOGLE_PLAY, bought.token)
        assert record is not None
        assert record.state.value == "credited"
        # The same token again (another request id): the wallet is asked under the same key (and
        # says already credited); the consume is not queued a second time.
        receipts.wallet.credit_state = wpb.CREDIT_STATE_ALREADY_CREDITED
        again = await verify(receipts, bought.token, product_id="coins_350", request_id="r-again")
        assert again.state == pb.PURCHASE_STATE_ALREADY_CREDITED
        assert wallet_credits(receipts) == [("fan-1", bought.token, 350)] * 2
        assert queued == [bought.token]


async def test_another_account_is_refused(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with google_receipts(keys, database_url, tmp_path) as (receipts, play):
        # Bound at purchase time to fan-1: fan-2 is refused before anything is recorded.
        bound = play.buy("coins_70", account_id=binding(receipts, "fan-1"))
        assert await refused(receipts, bound.token, account_id="fan-2") == (
            grpc.StatusCode.PERMISSION_DENIED,
            "ACCOUNT_MISMATCH",
        )
        assert await receipts.components.purchases.get(StoreId.GOOGLE_PLAY, bound.token) is None
        assert (await verify(receipts, bound.token)).state == pb.PURCHASE_STATE_CREDITED
        # No obfuscatedAccountId: the first account to claim it owns it.
        unbound = play.buy("coins_70")
        assert (await verify(receipts, unbound.token, account_id="fan-3")).state == pb.PURCHASE_STATE_CREDITED
        assert await refused(receipts, unbound.token, account_id="fan-4") == (
            grpc.StatusCode.PERMISSION_DENIED,
            "RECEIPT_BOUND_TO_OTHER_ACCOUNT",
        )
        assert [(account, coins) for account, _, coins in wallet_credits(receipts)] == [("fan-1", 70), ("fan-3", 70)]


async def test_pending_credits_nothing_until_paid(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with google_receipts(keys, database_url, tmp_path) as (receipts, play):
        bought = play.buy("coins_70", account_id=binding(receipts, "fan-1"), pending=True)
        result = await verify(receipts, bought.token, request_id="p-1")
        assert result.state == pb.PURCHASE_STATE_PENDING
        assert result.coins_credited == 0
        assert receipts.wallet.credits == []
        google = receipts.components.google
        assert await receipts.components.database.run(google.consumptions.get, bought.token) is None
        play.complete(bought.token)
        paid = await verify(receipts, bought.token, request_id="p-2")
        assert paid.state == pb.PURCHASE_STATE_CREDITED
        assert paid.order_id == bought.order_id != ""
        assert wallet_credits(receipts) == [("fan-1", bought.token, 70)]


async def test_cancelled_is_refused(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with google_receipts(keys, database_url, tmp_path) as (receipts, play):
        bought = play.buy("coins_70", account_id=binding(receipts, "fan-1"), pending=True)
        assert (await verify(receipts, bought.token, request_id="x-1")).state == pb.PURCHASE_STATE_PENDING
        play.cancel(bought.token)
        assert await refused(receipts, bought.token, request_id="x-2") == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "PURCHASE_CANCELLED",
        )
        record = await receipts.components.purchases.get(StoreId.GOOGLE_PLAY, bought.token)
        assert record is not None
        assert record.state.value == "revoked"
        assert receipts.wallet.credits == []


async def test_quantity_multiplies_the_pack(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with google_receipts(keys, database_url, tmp_path) as (receipts, play):
        bought = play.buy("coins_350", account_id=binding(receipts, "fan-1"), quantity=3)
        resource = bought.v2()  # what Google answers for the token when it is verified
        result = await verify(receipts, bought.token, product_id="coins_350")
        assert (result.quantity, result.coins_credited) == (3, 1050)
        assert result.price.amount_minor == 3 * 599
        assert wallet_credits(receipts) == [("fan-1", bought.token, 1050)]
        # The wallet keeps the hash of the purchase resource the credit rests on.
        assert receipts.wallet.only_credit(bought.token).evidence_sha256 == evidence_hash(resource)


async def test_test_purchases_are_sandbox_and_follow_the_policy(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with google_receipts(keys, database_url, tmp_path) as (receipts, play):
        bought = play.buy("coins_70", account_id=binding(receipts, "fan-1"), test=True)
        result = await verify(receipts, bought.token)
        assert result.state == pb.PURCHASE_STATE_CREDITED
        assert result.environment == pb.STORE_ENVIRONMENT_SANDBOX
        assert receipts.wallet.only_credit(bought.token).environment == wpb.STORE_ENVIRONMENT_SANDBOX
    # Production settings: test purchases only for the allow-listed accounts (e.g. the review account).
    async with google_receipts(keys, database_url, tmp_path / "strict", {"SANDBOX_ACCOUNTS": "reviewer"}) as (
        receipts,
        play,
    ):
        bought = play.buy("coins_70", account_id=binding(receipts, "fan-1"), test=True)
        assert await refused(receipts, bought.token) == (grpc.StatusCode.FAILED_PRECONDITION, "SANDBOX_NOT_ALLOWED")
        assert receipts.wallet.credits == []
        allowed = play.buy("coins_70", account_id=binding(receipts, "reviewer"), test=True)
        assert (await verify(receipts, allowed.token, account_id="reviewer")).state == pb.PURCHASE_STATE_CREDITED
        real = play.buy("coins_70", account_id=binding(receipts, "fan-1"))
        assert (await verify(receipts, real.token)).environment == pb.STORE_ENVIRONMENT_PRODUCTION


async def test_product_and_package_must_match(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with google_receipts(keys, database_url, tmp_path) as (receipts, play):
        bought = play.buy("coins_70", account_id=binding(receipts, "fan-1"))
        assert await refused(receipts, bought.token, product_id="coins_7000") == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "PRODUCT_MISMATCH",
        )
        assert await refused(receipts, bought.token, package_name="com.other.app") == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "PACKAGE_MISMATCH",
        )
        other_app = play.buy("coins_70", package_name="com.other.app")
        assert await refused(receipts, other_app.token) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PURCHASE_TOKEN")
        unknown = play.buy("coins_9", account_id=binding(receipts, "fan-1"))
        assert await refused(receipts, unknown.token, product_id="coins_9") == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "UNKNOWN_PRODUCT",
        )
        assert receipts.wallet.credits == []


async def test_region_policy_on_region_code(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with google_receipts(keys, database_url, tmp_path) as (receipts, play):
        bought = play.buy("coins_70", account_id=binding(receipts, "fan-1"), region_code="DE")
        result = await verify(receipts, bought.token, account_region="US")
        assert result.state == pb.PURCHASE_STATE_CREDITED
        assert (result.storefront, result.flagged_for_review) == ("DE", True)
    async with google_receipts(keys, database_url, tmp_path / "refuse", {"REGION_POLICY": "refuse"}) as (
        receipts,
        play,
    ):
        bought = play.buy("coins_70", account_id=binding(receipts, "fan-1"), region_code="DE")
        assert await refused(receipts, bought.token, account_region="US") == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "REGION_MISMATCH",
        )
        assert (await verify(receipts, bought.token, account_region="DE", request_id="de")).state == (
            pb.PURCHASE_STATE_CREDITED
        )


async def test_consumed_at_google(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with google_receipts(keys, database_url, tmp_path) as (receipts, play):
        ours = play.buy("coins_70", account_id=binding(receipts, "fan-1"))
        assert (await verify(receipts, ours.token)).state == pb.PURCHASE_STATE_CREDITED
        play.consume(PACKAGE, "coins_70", ours.token)
        receipts.wallet.credit_state = wpb.CREDIT_STATE_ALREADY_CREDITED
        assert (await verify(receipts, ours.token, request_id="again")).state == pb.PURCHASE_STATE_ALREADY_CREDITED
        # Consumed elsewhere and never credited here: refused, nothing credited.
        foreign = play.buy("coins_70", account_id=binding(receipts, "fan-1"))
        play.consume(PACKAGE, "coins_70", foreign.token)
        assert await refused(receipts, foreign.token) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "PURCHASE_ALREADY_CONSUMED",
        )
        assert wallet_credits(receipts) == [("fan-1", ours.token, 70)] * 2


@pytest.mark.parametrize(
    ("setup", "code", "reason"),
    [
        ("malformed", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PURCHASE_TOKEN"),
        ("bad-characters", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PURCHASE_TOKEN"),
        ("unknown", grpc.StatusCode.NOT_FOUND, "PURCHASE_NOT_FOUND"),
        ("expired", grpc.StatusCode.FAILED_PRECONDITION, "PURCHASE_TOKEN_EXPIRED"),
        ("401", grpc.StatusCode.UNAVAILABLE, "STORE_AUTH_FAILED"),
        ("403", grpc.StatusCode.UNAVAILABLE, "STORE_AUTH_FAILED"),
        ("revoked-account", grpc.StatusCode.UNAVAILABLE, "STORE_AUTH_FAILED"),
        ("429-always", grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
        ("503-always", grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
        ("slow", grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
    ],
)
async def test_google_errors_map_to_stable_reasons(
    keys: Keys,
    sqlite_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    setup: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    # Only where every answer is slow does a short timeout run: no healthy call can miss it. Elsewhere
    # the calls keep google_settings' generous timeout, which a busy machine does not trip.
    extra = {"GOOGLE_API_TIMEOUT_SECONDS": "0.5"} if setup == "slow" else {}
    async with google_receipts(keys, sqlite_url, tmp_path, extra) as (receipts, play):
        token = arrange(play, setup, binding(receipts, "fan-1"))
        with caplog.at_level(logging.ERROR):
            assert await refused(receipts, token) == (code, reason)
        if reason == "STORE_AUTH_FAILED":
            assert any("COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE" in r.getMessage() for r in caplog.records)
        assert receipts.wallet.credits == []


def arrange(play: PlayState, setup: str, account: str) -> str:
    if setup == "malformed":
        return "not-a-play-token"
    if setup == "bad-characters":
        return "tok en/"  # (control characters never get this far: the interceptor refuses them)
    if setup == "unknown":
        return "abcdefghijklmnopqrstuvwx.AO-J1OnotKnownHere"
    token = play.buy("coins_70", account_id=account).token
    if setup == "expired":
        play.expire(token)
    elif setup in ("401", "403"):
        play.inject(Fault("getv2", int(setup), 10))
    elif setup == "revoked-account":
        play.revoked_service_account = True
    elif setup == "429-always":
        play.inject(Fault("getv2", 429, 10))
    elif setup == "503-always":
        play.inject(Fault("getv2", 503, 10))
    elif setup == "slow":
        play.inject(Fault("getv2", 0, 10, delay_seconds=2.0))
    return token


async def test_transient_failures_are_retried(keys: Keys, sqlite_url: str, tmp_path: Path) -> None:
    # The healthy last answer runs under the same timeout as the slow one: 2 s, not a tight one.
    async with google_receipts(keys, sqlite_url, tmp_path, {"GOOGLE_API_TIMEOUT_SECONDS": "2"}) as (receipts, play):
        bought = play.buy("coins_70", account_id=binding(receipts, "fan-1"))
        play.inject(Fault("getv2", 429, 1))
        play.inject(Fault("getv2", 503, 1))
        play.inject(Fault("getv2", 0, 1, delay_seconds=3.0))
        assert (await verify(receipts, bought.token)).state == pb.PURCHASE_STATE_CREDITED
        calls = [path for method, path in play.requests if "productsv2" in path]
        assert len(calls) == 4


async def test_request_id_replays_the_original_answer(keys: Keys, sqlite_url: str, tmp_path: Path) -> None:
    async with google_receipts(keys, sqlite_url, tmp_path) as (receipts, play):
        bought = play.buy("coins_70", account_id=binding(receipts, "fan-1"))
        first = await verify(receipts, bought.token, request_id="same")
        replay = await verify(receipts, bought.token, request_id="same")
        assert first == replay
        assert replay.state == pb.PURCHASE_STATE_CREDITED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await verify(receipts, bought.token, request_id="same", product_id="coins_350")
        assert error_reason(caught.value) == "REQUEST_ID_REUSED"
