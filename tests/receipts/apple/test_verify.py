"""VerifyApplePurchase end to end: a real receipts gRPC server, the App Store
simulator over HTTP, and a fake wallet on a real port that records every call
(crediting once is the real wallet's, in apple/test_with_wallet.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import httpx
import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.storesim.apple import AppleStore, Fault, make_pki
from tests.receipts.support import Receipts, apple_simulator, receipts_service, simulator_settings
from tests.support.status import error_reason
from tests.support.tokens import Keys

PACK = "com.coinstore.coins.350"


class World:
    def __init__(self, receipts: Receipts, store: AppleStore, url: str) -> None:
        self.receipts = receipts
        self.store = store
        self.url = url

    async def token(self, account_id: str) -> str:
        reply = await self.receipts.stub.GetPurchaseBinding(
            pb.GetPurchaseBindingRequest(account_id=account_id), metadata=self.receipts.md(), timeout=10
        )
        return str(reply.app_account_token)

    async def device_buy(self, **body: object) -> tuple[str, str]:
        """Buy through the simulator's HTTP endpoint, as the app would via StoreKit."""
        async with httpx.AsyncClient() as client:
            reply = await client.post(f"{self.url}/apple/buy", json={"productId": PACK, **body}, timeout=5)
        reply.raise_for_status()
        data = reply.json()
        return data["transactionId"], data["signedTransaction"]

    async def verify(self, request: pb.VerifyApplePurchaseRequest) -> pb.VerifyApplePurchaseResponse:
        return await self.receipts.stub.VerifyApplePurchase(request, metadata=self.receipts.md(), timeout=20)

    async def refused(self, request: pb.VerifyApplePurchaseRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.verify(request)
        return caught.value.code(), error_reason(caught.value)


@asynccontextmanager
async def world_with(
    keys: Keys, database_url: str, tmp_path: Path, settings: Mapping[str, str] | None = None
) -> AsyncIterator[World]:
    """The simulator and a receipts service on its URLs, with ``settings`` on top."""
    async with (
        apple_simulator(tmp_path) as (store, url),
        receipts_service(keys, database_url, tmp_path, {**simulator_settings(url), **(settings or {})}) as receipts,
    ):
        yield World(receipts, store, url)


@pytest.fixture
async def world(keys: Keys, database_url: str, tmp_path: Path) -> AsyncIterator[World]:
    async with world_with(keys, database_url, tmp_path) as world:
        yield world


async def test_signed_transaction_credited_once(world: World) -> None:
    token = await world.token("fan-1")
    txid, jws = await world.device_buy(appAccountToken=token, quantity=2)
    request = pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", signed_transaction=jws)
    first = await world.verify(request)
    (purchase,) = first.purchases
    assert purchase.state == pb.PURCHASE_STATE_CREDITED
    assert purchase.store_transaction_id == txid
    assert (purchase.quantity, purchase.coins_credited, purchase.new_balance) == (2, 700, 700)
    assert purchase.environment == pb.STORE_ENVIRONMENT_PRODUCTION  # the simulator signs Production by default
    assert purchase.storefront == "USA"
    assert (purchase.price.amount_minor, purchase.price.currency_code) == (1298, "USD")
    wallet = world.receipts.wallet
    assert [(c.account_id, c.coins) for c in wallet.credits_of(txid)] == [("fan-1", 700)]
    # The same request id replays the recorded answer without asking the wallet again.
    assert await world.verify(request) == first
    assert len(wallet.credits) == 1
    # Another request id asks again under the same key, and passes the wallet's ALREADY_CREDITED on.
    wallet.credit_state = wpb.CREDIT_STATE_ALREADY_CREDITED
    again = await world.verify(
        pb.VerifyApplePurchaseRequest(request_id="r-2", account_id="fan-1", signed_transaction=jws)
    )
    assert again.purchases[0].state == pb.PURCHASE_STATE_ALREADY_CREDITED
    assert [(c.account_id, c.coins) for c in wallet.credits_of(txid)] == [("fan-1", 700)] * 2
    code, reason = await world.refused(
        pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-2", signed_transaction=jws)
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED")


async def test_a_reused_request_id_records_nothing_of_the_other_purchase(world: World) -> None:
    token = await world.token("fan-1")
    _txid, jws = await world.device_buy(appAccountToken=token)
    await world.verify(pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", signed_transaction=jws))
    other_txid, other = await world.device_buy(appAccountToken=token)
    code, reason = await world.refused(
        pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", signed_transaction=other)
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED")
    # Refused before anything moved: the other purchase is neither recorded nor credited.
    assert world.receipts.wallet.credits_of(other_txid) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.receipts.stub.GetPurchase(
            pb.GetPurchaseRequest(store=pb.STORE_APP_STORE, store_transaction_id=other_txid),
            metadata=world.receipts.md(),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_answered_call_keeps_its_answer_while_the_app_store_is_down(world: World) -> None:
    txid, _jws = await world.device_buy(environment="Production")
    request = pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", transaction_id=txid)
    first = await world.verify(request)
    assert first.purchases[0].state == pb.PURCHASE_STATE_CREDITED
    world.store.inject(Fault(status=500, count=100))
    assert await world.verify(request) == first
    assert len(world.receipts.wallet.credits_of(txid)) == 1


async def test_a_stalled_wallet_answers_unavailable_at_the_configured_deadline(
    keys: Keys, database_url: str, tmp_path: Path
) -> None:
    async with world_with(keys, database_url, tmp_path, {"WALLET_CALL_TIMEOUT_SECONDS": "0.5"}) as world:
        receipts = world.receipts
        _txid, jws = await world.device_buy()
        receipts.wallet.stall = stalled = asyncio.Event()
        request = pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", signed_transaction=jws)
        # Well inside the caller's own 5 s deadline (the default wallet deadline is 10 s).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await receipts.stub.VerifyApplePurchase(request, metadata=receipts.md(), timeout=5)
        assert (caught.value.code(), error_reason(caught.value)) == (grpc.StatusCode.UNAVAILABLE, "WALLET_UNAVAILABLE")
        assert "CreditPurchases" in receipts.wallet.calls
        stalled.set()


async def test_second_account_refused_nothing_moves(world: World) -> None:
    _txid, bound = await world.device_buy(appAccountToken=await world.token("fan-1"))
    code, reason = await world.refused(
        pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-2", signed_transaction=bound)
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ACCOUNT_MISMATCH")
    # Without appAccountToken the first account to claim it owns it.
    _txid, unbound = await world.device_buy()
    await world.verify(pb.VerifyApplePurchaseRequest(request_id="r-2", account_id="fan-1", signed_transaction=unbound))
    calls = len(world.receipts.wallet.calls)
    code, reason = await world.refused(
        pb.VerifyApplePurchaseRequest(request_id="r-3", account_id="fan-2", signed_transaction=unbound)
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "RECEIPT_BOUND_TO_OTHER_ACCOUNT")
    assert len(world.receipts.wallet.calls) == calls
    assert [c.account_id for c in world.receipts.wallet.credits] == ["fan-1"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"bundleId": "com.example.other"}, (grpc.StatusCode.INVALID_ARGUMENT, "WRONG_BUNDLE")),
        ({"environment": "Xcode"}, (grpc.StatusCode.FAILED_PRECONDITION, "WRONG_ENVIRONMENT")),
        ({"type": "Non-Consumable"}, (grpc.StatusCode.FAILED_PRECONDITION, "NOT_CONSUMABLE")),
        ({"productId": "com.example.unknown"}, (grpc.StatusCode.FAILED_PRECONDITION, "UNKNOWN_PRODUCT")),
    ],
)
async def test_refusals_have_their_own_reasons(
    world: World, change: dict[str, str], expected: tuple[grpc.StatusCode, str]
) -> None:
    _txid, jws = await world.device_buy(**change)
    assert (
        await world.refused(pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", signed_transaction=jws))
        == expected
    )
    assert world.receipts.wallet.calls == []


async def test_forged_and_foreign_signatures_refused(world: World) -> None:
    from services.storesim.apple import JwsSigner

    _txid, jws = await world.device_buy()
    header, payload, signature = jws.split(".")
    # A well-formed payload with one value changed: only the signature can tell.
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["quantity"] = claims.get("quantity", 1) + 9
    changed = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    tampered = f"{header}.{changed}.{signature}"
    assert await world.refused(
        pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", signed_transaction=tampered)
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SIGNATURE")
    foreign = make_pki(name="Foreign")
    forged = JwsSigner(foreign.leaf_key, foreign.chain).sign(world.store.transaction(_txid) or {})
    assert await world.refused(
        pb.VerifyApplePurchaseRequest(request_id="r-2", account_id="fan-1", signed_transaction=forged)
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "UNTRUSTED_CHAIN")
    assert await world.refused(
        pb.VerifyApplePurchaseRequest(request_id="r-3", account_id="fan-1", signed_transaction="garbage")
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_JWS")
    assert await world.refused(pb.VerifyApplePurchaseRequest(request_id="r-4", account_id="fan-1")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


async def test_revoked_transaction_credits_nothing(world: World) -> None:
    txid, _ = await world.device_buy()
    world.store.refund(txid)
    revoked = world.store.signed_transaction(txid)
    reply = await world.verify(
        pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", signed_transaction=revoked)
    )
    assert reply.purchases[0].state == pb.PURCHASE_STATE_REVOKED
    assert reply.purchases[0].coins_credited == 0
    assert world.receipts.wallet.calls == []


async def test_transaction_id_with_sandbox_fallback(world: World) -> None:
    txid, _ = await world.device_buy(environment="Sandbox")
    reply = await world.verify(pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", transaction_id=txid))
    assert reply.purchases[0].state == pb.PURCHASE_STATE_CREDITED
    assert reply.purchases[0].environment == pb.STORE_ENVIRONMENT_SANDBOX
    paths = [p for _m, p, _q in world.store.api_calls]
    assert paths == [
        f"/apple/production/inApps/v1/transactions/{txid}",
        f"/apple/sandbox/inApps/v1/transactions/{txid}",
    ]
    assert await world.refused(
        pb.VerifyApplePurchaseRequest(request_id="r-2", account_id="fan-1", transaction_id="999999999")
    ) == (grpc.StatusCode.NOT_FOUND, "TRANSACTION_NOT_FOUND")


async def test_sandbox_is_credited_only_to_allow_listed_accounts(keys: Keys, sqlite_url: str, tmp_path: Path) -> None:
    """Production settings list the App Review demo account: App Review buys in the Sandbox
    against the production build and must be credited; nobody else's Sandbox purchase is."""
    async with world_with(keys, sqlite_url, tmp_path, {"SANDBOX_ACCOUNTS": "app-review"}) as world:
        txid, jws = await world.device_buy(environment="Sandbox")
        assert await world.refused(
            pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", signed_transaction=jws)
        ) == (grpc.StatusCode.FAILED_PRECONDITION, "SANDBOX_NOT_ALLOWED")
        # A transaction id is not even looked up in the Sandbox for an account that may not buy there.
        assert await world.refused(
            pb.VerifyApplePurchaseRequest(request_id="r-2", account_id="fan-1", transaction_id=txid)
        ) == (grpc.StatusCode.NOT_FOUND, "TRANSACTION_NOT_FOUND")
        assert all("/sandbox/" not in p for _m, p, _q in world.store.api_calls)
        assert world.receipts.wallet.credits == []
        _, review_jws = await world.device_buy(environment="Sandbox")
        reply = await world.verify(
            pb.VerifyApplePurchaseRequest(request_id="r-3", account_id="app-review", signed_transaction=review_jws)
        )
        assert (reply.purchases[0].state, reply.purchases[0].environment) == (
            pb.PURCHASE_STATE_CREDITED,
            pb.STORE_ENVIRONMENT_SANDBOX,
        )


async def test_legacy_receipt_asks_the_wallet_for_each_consumable(world: World) -> None:
    ids = [(await world.device_buy(customer="apple-id-1", environment="Production"))[0] for _ in range(3)]
    await world.device_buy(customer="apple-id-1", environment="Production", type="Non-Consumable", productId="x")
    receipt = world.store.app_receipt(ids[:1])
    reply = await world.verify(pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", app_receipt=receipt))
    assert sorted(p.store_transaction_id for p in reply.purchases) == sorted(ids)
    assert {p.state for p in reply.purchases} == {pb.PURCHASE_STATE_CREDITED}
    assert sorted(c.store_transaction_id for c in world.receipts.wallet.credits) == sorted(ids)
    assert await world.refused(
        pb.VerifyApplePurchaseRequest(request_id="r-3", account_id="fan-1", app_receipt="bm90IGEgcmVjZWlwdA==")
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_RECEIPT")
    # 5,000 nested SEQUENCEs exhaust the ASN.1 decoder's recursion: still the caller's bad input.
    nested = b"\x30\x00"
    for _ in range(5000):
        size = len(nested).to_bytes(3, "big")  # DER long form: 0x83 and three length bytes
        nested = b"\x30\x83" + size + nested
    assert await world.refused(
        pb.VerifyApplePurchaseRequest(
            request_id="r-4", account_id="fan-1", app_receipt=base64.b64encode(nested).decode()
        )
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_RECEIPT")


async def test_dependencies_down_are_unavailable(world: World) -> None:
    txid, jws = await world.device_buy(environment="Production")
    world.store.inject(Fault(status=500, count=100))
    assert await world.refused(
        pb.VerifyApplePurchaseRequest(request_id="r-1", account_id="fan-1", transaction_id=txid)
    ) == (grpc.StatusCode.UNAVAILABLE, "APP_STORE_UNAVAILABLE")
    world.receipts.wallet.down = True
    assert await world.refused(
        pb.VerifyApplePurchaseRequest(request_id="r-2", account_id="fan-1", signed_transaction=jws)
    ) == (grpc.StatusCode.UNAVAILABLE, "WALLET_UNAVAILABLE")
    world.receipts.wallet.down = False
    reply = await world.verify(
        pb.VerifyApplePurchaseRequest(request_id="r-2", account_id="fan-1", signed_transaction=jws)
    )
    assert reply.purchases[0].state == pb.PURCHASE_STATE_CREDITED


async def test_same_request_id_concurrently_gets_one_answer(world: World) -> None:
    txid, jws = await world.device_buy(appAccountToken=await world.token("fan-1"))
    request = pb.VerifyApplePurchaseRequest(request_id="same", account_id="fan-1", signed_transaction=jws)
    replies = await asyncio.gather(*(world.verify(request) for _ in range(8)))
    # The fake answers each call with a growing balance: one recorded answer is replayed to all.
    assert all(r == replies[0] for r in replies)
    assert replies[0].purchases[0].state == pb.PURCHASE_STATE_CREDITED
    # Calls racing past the request log ask the wallet under one key and one wallet request id
    # (which the real wallet replays).
    asked = {(c.store_transaction_id, c.request_id) for c in world.receipts.wallet.credits}
    assert len(asked) == 1
    assert next(iter(asked))[0] == txid


@pytest.mark.parametrize("policy", ["flag", "refuse"])
async def test_region_policy_through_verify_apple_purchase(
    policy: str, keys: Keys, database_url: str, tmp_path: Path
) -> None:
    """The storefront Apple signed against the account's country, as the caller gives it:
    'flag' (the default) credits and marks for review, 'refuse' refuses before the wallet."""
    async with (
        apple_simulator(tmp_path) as (store, url),
        receipts_service(
            keys, database_url, tmp_path, {**simulator_settings(url), "REGION_POLICY": policy}
        ) as receipts,
    ):
        world = World(receipts, store, url)
        token = await world.token("fan-de")
        txid, turkish = await world.device_buy(appAccountToken=token, storefront="TUR")
        _, german = await world.device_buy(appAccountToken=token, storefront="DEU")

        def request(n: int, jws: str, region: str = "DE") -> pb.VerifyApplePurchaseRequest:
            return pb.VerifyApplePurchaseRequest(
                request_id=f"r-{n}", account_id="fan-de", signed_transaction=jws, account_region=region
            )

        bad_region = await world.refused(request(0, turkish, "Germany"))
        assert bad_region[0] == grpc.StatusCode.INVALID_ARGUMENT
        home = await world.verify(request(1, german))
        assert home.purchases[0].state == pb.PURCHASE_STATE_CREDITED
        assert not home.purchases[0].flagged_for_review
        if policy == "flag":
            abroad = await world.verify(request(2, turkish))
            assert abroad.purchases[0].state == pb.PURCHASE_STATE_CREDITED
            assert abroad.purchases[0].flagged_for_review
            assert receipts.wallet.only_credit(txid).flagged_for_review
        else:
            code, reason = await world.refused(request(2, turkish))
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REGION_MISMATCH")
            assert receipts.wallet.credits_of(txid) == []
            # An account whose country is not given is not judged.
            unknown = await world.verify(request(3, turkish, ""))
            assert unknown.purchases[0].state == pb.PURCHASE_STATE_CREDITED
