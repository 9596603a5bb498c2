"""The Android Publisher client against the Play simulator over real HTTP:
bundled discovery, the service-account JWT-bearer flow, per-thread HTTP,
consume/acknowledge, voided purchases with paging, and the simulator's wire
format (Google's error envelope, URL-decoded tokens, control endpoints)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from services.receipts.google.client import PlayApiError, PlayClient, StoreAuthFailed, StoreUnavailable, _prepared
from services.receipts.google.rules import VoidedQuery
from services.storesim.google import SOURCE_DEVELOPER, Fault, PlayState
from tests.receipts.google.support import PACKAGE, play_simulator_thread


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[PlayState, str]]:
    with play_simulator_thread(tmp_path) as world:
        yield world


@pytest.fixture
def client(sim: tuple[PlayState, str]) -> Iterator[PlayClient]:
    play, base = sim
    client = PlayClient(play.service_account_path, endpoint=base + "/", timeout_seconds=2, backoff_seconds=0.01)
    yield client
    client.close()


def http(method: str, url: str, body: dict[str, Any] | None = None, **headers: str) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw)
        except ValueError:
            return error.code, raw.decode()


def test_static_discovery_and_the_jwt_bearer_flow(sim: tuple[PlayState, str], client: PlayClient) -> None:
    play, _base = sim
    token = play.buy("coins_70", account_id="acct-1", region_code="JP").token
    purchase = client.get_purchase_v2(PACKAGE, token)
    assert (purchase.purchase_state, purchase.obfuscated_account_id, purchase.region_code) == (
        "PURCHASED",
        "acct-1",
        "JP",
    )
    assert purchase.line_items[0].product_id == "coins_70"
    assert not purchase.test
    assert purchase.raw["kind"] == "androidpublisher#productPurchaseV2"
    # Only API paths reached the network: the discovery document came from the package.
    assert all(path.startswith("/androidpublisher/v3/applications/") for _m, path in play.requests)
    assert hasattr(client._service().service.purchases(), "productsv2")


def test_api_refuses_requests_without_an_access_token(sim: tuple[PlayState, str]) -> None:
    play, base = sim
    token = play.buy("coins_70").token
    status, body = http("GET", f"{base}/androidpublisher/v3/applications/{PACKAGE}/purchases/productsv2/tokens/{token}")
    assert status == 401
    assert body["error"]["code"] == 401
    assert body["error"]["errors"][0]["reason"] == "required"


def test_token_endpoint_checks_the_assertion(sim: tuple[PlayState, str], tmp_path: Path) -> None:
    play, base = sim
    status, body = http("POST", f"{base}/token")
    assert body["error"] == "unsupported_grant_type"
    assert status == 400
    # A key the simulator never issued: the RS256 signature does not verify.
    forged = json.loads(play.service_account_path.read_text())
    forged["private_key"] = PlayState(tmp_path / "other").service_account_info(base)["private_key"]
    forged_path = tmp_path / "forged.json"
    forged_path.write_text(json.dumps(forged))
    forged_client = PlayClient(forged_path, endpoint=base + "/", timeout_seconds=2)
    with pytest.raises(StoreAuthFailed):
        forged_client.get_purchase_v2(PACKAGE, play.buy("coins_70").token)
    missing = PlayClient(tmp_path / "nope.json", endpoint=base + "/", timeout_seconds=2)
    with pytest.raises(StoreAuthFailed):
        missing.get_purchase_v2(PACKAGE, "abcdefghijklmnopqrstuvwx.AO-J1Ox")


def test_tokens_are_url_encoded_and_decoded(sim: tuple[PlayState, str], client: PlayClient) -> None:
    play, _base = sim
    token = "tok/with+special=chars"
    play.buy("coins_70", token=token)
    assert client.get_purchase_v2(PACKAGE, token).purchase_state == "PURCHASED"
    assert client.get_purchase(PACKAGE, "coins_70", token)["purchaseState"] == 0
    client.consume(PACKAGE, "coins_70", token)
    assert play.get(token).consumed  # type: ignore[union-attr]
    assert any("tok%2Fwith%2Bspecial%3Dchars" in path for _m, path in play.requests)


def test_v1_get_consume_and_acknowledge(sim: tuple[PlayState, str], client: PlayClient) -> None:
    play, _base = sim
    bought = play.buy("coins_350", quantity=2, test=True)
    v1 = client.get_purchase(PACKAGE, "coins_350", bought.token)
    assert v1["kind"] == "androidpublisher#productPurchase"
    assert (v1["purchaseState"], v1["consumptionState"], v1["acknowledgementState"], v1["purchaseType"]) == (0, 0, 0, 0)
    assert v1["quantity"] == 2
    assert isinstance(v1["purchaseTimeMillis"], str)
    with pytest.raises(PlayApiError) as caught:
        client.get_purchase(PACKAGE, "coins_70", bought.token)
    assert (caught.value.status, caught.value.reason) == (400, "purchaseTokenDoesNotMatchProductId")
    client.acknowledge(PACKAGE, "coins_350", bought.token, developer_payload="order-42")
    assert client.get_purchase(PACKAGE, "coins_350", bought.token)["developerPayload"] == "order-42"
    with pytest.raises(PlayApiError) as caught:
        client.acknowledge(PACKAGE, "coins_350", bought.token)
    assert (caught.value.status, caught.value.reason) == (400, "invalidPurchaseState")
    client.consume(PACKAGE, "coins_350", bought.token)
    with pytest.raises(PlayApiError) as caught:
        client.consume(PACKAGE, "coins_350", bought.token)
    assert caught.value.reason == "invalidPurchaseState"
    v2 = client.get_purchase_v2(PACKAGE, bought.token)
    assert v2.line_items[0].consumed
    assert v2.acknowledgement_state == "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED"
    assert v2.test


def test_pending_purchase_has_no_order_until_paid(sim: tuple[PlayState, str], client: PlayClient) -> None:
    play, _base = sim
    bought = play.buy("coins_70", pending=True)
    pending = client.get_purchase_v2(PACKAGE, bought.token)
    assert (pending.purchase_state, pending.order_id, pending.completion_time) == ("PENDING", "", None)
    with pytest.raises(PlayApiError) as caught:
        client.consume(PACKAGE, "coins_70", bought.token)
    assert caught.value.reason == "invalidPurchaseState"
    play.complete(bought.token)
    paid = client.get_purchase_v2(PACKAGE, bought.token)
    assert paid.purchase_state == "PURCHASED"
    assert paid.order_id.startswith("GPA.")
    assert paid.completion_time is not None


def test_voided_purchases_page_and_filter(sim: tuple[PlayState, str], client: PlayClient) -> None:
    play, _base = sim
    multi = play.buy("coins_70", quantity=3)
    partial = play.refund(multi.token, 1)
    rest = play.refund(multi.token)
    singles = [play.buy("coins_70").token for _ in range(4)]
    for token in singles:
        play.refund(token, source=SOURCE_DEVELOPER, reason=7)
    assert partial.voided_quantity == 1
    assert rest.voided_quantity is None
    purchase = client.get_purchase_v2(PACKAGE, multi.token)
    assert (purchase.purchase_state, purchase.line_items[0].refundable_quantity) == ("CANCELLED", 0)

    everything = list(client.iter_voided(PACKAGE, VoidedQuery(max_results=2)))
    assert len(everything) == 6
    assert [v.voided_quantity for v in everything[:2]] == [1, None]
    assert [v.purchase_token for v in everything[2:]] == singles
    assert {(v.voided_source, v.voided_reason) for v in everything[2:]} == {(SOURCE_DEVELOPER, 7)}
    first = client.list_voided_page(PACKAGE, VoidedQuery(max_results=2))
    assert len(first.purchases) == 2
    assert first.next_page_token
    last = client.list_voided_page(PACKAGE, VoidedQuery(max_results=5), first.next_page_token)
    assert (len(last.purchases), last.next_page_token) == (4, "")
    # Without includeQuantityBasedPartialRefund the partial refund is left out.
    full_only = list(client.iter_voided(PACKAGE, VoidedQuery(include_partial_refunds=False)))
    assert len(full_only) == 5
    # startTime/endTime filter on when the void was recorded.
    later = list(client.iter_voided(PACKAGE, VoidedQuery(start_time_ms=everything[-1].voided_time_ms)))
    assert everything[-1].purchase_token in {v.purchase_token for v in later}
    with pytest.raises(PlayApiError) as caught:
        client.list_voided_page(PACKAGE, VoidedQuery(end_time_ms=everything[-1].voided_time_ms + 10**9))
    assert caught.value.status == 400


def test_not_found_uses_googles_error_envelope(sim: tuple[PlayState, str], client: PlayClient) -> None:
    with pytest.raises(PlayApiError) as caught:
        client.get_purchase_v2(PACKAGE, "abcdefghijklmnopqrstuvwx.AO-J1Ounknown")
    assert (caught.value.status, caught.value.reason) == (404, "purchaseTokenNotFound")
    assert caught.value.message == "The purchase token was not found."


def test_many_threads_each_with_their_own_http(sim: tuple[PlayState, str], client: PlayClient) -> None:
    play, _base = sim
    tokens = [play.buy("coins_70").token for _ in range(24)]
    with ThreadPoolExecutor(8) as pool:
        states = list(pool.map(lambda t: client.get_purchase_v2(PACKAGE, t).purchase_state, tokens))
    assert states == ["PURCHASED"] * 24

    async def all_at_once() -> list[str]:
        found = await asyncio.gather(*(client.aget_purchase_v2(PACKAGE, t) for t in tokens))
        return [p.purchase_state for p in found]

    assert asyncio.run(all_at_once()) == ["PURCHASED"] * 24


@pytest.mark.parametrize(
    ("package", "token"),
    [
        (PACKAGE, "abcdefghijklmnopqrstuvwx.AO-J1OwAbC_dE~fG"),
        (PACKAGE, "with/slash?and#hash%25+plus space&amp=;:@"),
        (PACKAGE, "ünïcödé-€"),
        (PACKAGE, "x" * 2100),  # too long for a GET: googleapiclient sends a POST with x-http-method-override
        # A value that reads like another parameter's marker stays a value.
        ("coinstore-marker-token", "coinstore-marker-packageName"),
    ],
)
def test_the_async_look_up_sends_what_googleapiclient_builds(client: PlayClient, package: str, token: str) -> None:
    """The look-up's request is built once and filled in per call: it must be, byte for byte,
    the request googleapiclient builds and finishes for those values."""
    resources = client._service()
    built = resources.productsv2.getproductpurchasev2(packageName=package, token=token)
    assert resources.purchase_v2.fill(packageName=package, token=token)[0] == _prepared(built)


def test_simulator_control_endpoints_and_error_envelope(sim: tuple[PlayState, str]) -> None:
    play, base = sim
    status, bought = http(
        "POST",
        f"{base}/google/sim/purchases",
        {"productId": "coins_70", "obfuscatedAccountId": "a-1", "quantity": 2, "pending": True, "test": True},
    )
    assert status == 201
    assert (bought["state"], bought["quantity"], bought["test"]) == ("PENDING", 2, True)
    token = bought["purchaseToken"]
    assert http("POST", f"{base}/google/sim/purchases/{token}/complete")[1]["state"] == "PURCHASED"
    status, voided = http("POST", f"{base}/google/sim/purchases/{token}/refund", {"quantity": 1})
    assert (status, voided["voidedQuantity"], voided["kind"]) == (200, 1, "androidpublisher#voidedPurchase")
    assert http("GET", f"{base}/google/sim/purchases/{token}")[1]["refundableQuantity"] == 1
    assert http("POST", f"{base}/google/sim/faults", {"operation": "getv2", "status": 503, "count": 1})[0] == 204
    assert play.faults[0].status == 503
    assert http("DELETE", f"{base}/google/sim/faults")[0] == 204
    assert play.faults == []
    assert http("GET", f"{base}/google/sim/purchases/nope")[0] == 404
    events: list[str] = []
    play.subscribe(lambda e: events.append(e.kind))
    other = play.buy("coins_70", pending=True)
    play.cancel(other.token)
    paid = play.buy("coins_70")
    play.refund(paid.token)
    assert events == ["CANCELED", "PURCHASED", "VOIDED"]


async def test_the_async_look_up_answers_as_the_blocking_one(sim: tuple[PlayState, str], tmp_path: Path) -> None:
    """The event-loop path (no thread): Google's errors, retries and refusals map as execute() maps them."""
    play, base = sim
    client = PlayClient(play.service_account_path, endpoint=base + "/", timeout_seconds=2, backoff_seconds=0.01)
    try:
        token = "tok/with+special=chars"
        play.buy("coins_70", account_id="acct-1", token=token)
        purchase = await client.aget_purchase_v2(PACKAGE, token)
        assert (purchase.purchase_state, purchase.obfuscated_account_id) == ("PURCHASED", "acct-1")
        assert purchase.raw == client.get_purchase_v2(PACKAGE, token).raw
        assert any("tok%2Fwith%2Bspecial%3Dchars" in path for _m, path in play.requests)

        async def refused(token: str) -> tuple[int, str, str]:
            with pytest.raises(PlayApiError) as caught:
                await client.aget_purchase_v2(PACKAGE, token)
            return caught.value.status, caught.value.reason, caught.value.message

        assert await refused("abcdefghijklmnopqrstuvwx.AO-J1Ounknown") == (
            404,
            "purchaseTokenNotFound",
            "The purchase token was not found.",
        )
        assert (await refused("not-a-token"))[:2] == (400, "invalidValue")
        expired = play.buy("coins_70").token
        play.expire(expired)
        assert (await refused(expired))[:2] == (410, "purchaseTokenNoLongerValid")
        # 5xx and 429 are retried (4 attempts), then UNAVAILABLE; a 409 is Google's answer, not retried.
        play.inject(Fault("getv2", 503, 3))
        assert (await client.aget_purchase_v2(PACKAGE, token)).purchase_state == "PURCHASED"
        play.inject(Fault("getv2", 429, 1))
        assert (await client.aget_purchase_v2(PACKAGE, token)).purchase_state == "PURCHASED"
        play.inject(Fault("getv2", 500, 4))
        with pytest.raises(StoreUnavailable):
            await client.aget_purchase_v2(PACKAGE, token)
        play.inject(Fault("getv2", 409, 1))
        assert (await refused(token))[:2] == (409, "concurrentUpdate")
        assert not play.faults
        # Rejected credentials are STORE_AUTH_FAILED at once.
        play.revoked_service_account = True
        with pytest.raises(StoreAuthFailed):
            await client.aget_purchase_v2(PACKAGE, token)
        play.revoked_service_account = False
    finally:
        await client.aclose()
    # A deadline that passes is retried, then UNAVAILABLE.
    slow = PlayClient(
        play.service_account_path, endpoint=base + "/", timeout_seconds=0.3, attempts=2, backoff_seconds=0.01
    )
    try:
        play.inject(Fault("getv2", 0, 2, delay_seconds=1.0))
        with pytest.raises(StoreUnavailable) as caught:
            await slow.aget_purchase_v2(PACKAGE, token)
        assert "ReadTimeout" in caught.value.detail
        # A key the token endpoint refuses: STORE_AUTH_FAILED, as on the blocking path.
        forged = json.loads(play.service_account_path.read_text())
        forged["private_key"] = PlayState(tmp_path / "other").service_account_info(base)["private_key"]
        (tmp_path / "forged.json").write_text(json.dumps(forged))
        forged_client = PlayClient(tmp_path / "forged.json", endpoint=base + "/", timeout_seconds=2)
        with pytest.raises(StoreAuthFailed):
            await forged_client.aget_purchase_v2(PACKAGE, token)
        await forged_client.aclose()
    finally:
        await slow.aclose()


async def test_one_token_refresh_at_a_time_under_concurrency(sim: tuple[PlayState, str]) -> None:
    play, base = sim
    client = PlayClient(play.service_account_path, endpoint=base + "/", timeout_seconds=5, backoff_seconds=0.01)
    tokens = [play.buy("coins_70").token for _ in range(16)]

    async def all_at_once() -> list[str]:
        found = await asyncio.gather(*(client.aget_purchase_v2(PACKAGE, t) for t in tokens))
        return [p.purchase_state for p in found]

    try:
        # A slow token endpoint: every call finds the credentials without a token while the refresh runs.
        play.inject(Fault("token", 0, 16, delay_seconds=0.3))
        assert await all_at_once() == ["PURCHASED"] * 16
        assert play.access_tokens_issued == 1
        # A valid token is reused: no refresh.
        assert await all_at_once() == ["PURCHASED"] * 16
        assert play.access_tokens_issued == 1
        # Expiring (within google-auth's margin): refreshed once, before the calls go out.
        credentials = client._service().credentials
        assert credentials.expiry is not None
        credentials.expiry = credentials.expiry - timedelta(seconds=3600)
        assert await all_at_once() == ["PURCHASED"] * 16
        assert play.access_tokens_issued == 2
        # Revoked at Google before it expired: the 401s refresh it once and the calls are sent again.
        play.revoke_access_tokens()
        assert await all_at_once() == ["PURCHASED"] * 16
        assert play.access_tokens_issued == 3
    finally:
        play.clear_faults()
        await client.aclose()
