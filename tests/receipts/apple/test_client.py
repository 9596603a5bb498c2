"""The App Store Server API client against the App Store simulator over real
HTTP: JWT claims, 429 with Retry-After, 5xx and slow answers, 404, Sandbox
fallback, paging. The client's clock and sleep are fake (waiting is asserted
by what it asked to wait, never by the wall clock), and no healthy call ever
runs under a timeout a busy machine could miss."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from services.common.errors import DomainError
from services.receipts.apple.client import AppStoreApi, AppStoreApiRetries, TokenMinter, load_api_key
from services.receipts.purchases.model import Environment
from services.storesim.apple import BUNDLE_ID, ISSUER_ID, KEY_ID, AppleStore, Fault
from tests.receipts.support import apple_simulator


class FakeTime:
    """The client's clock and sleep: sleeping records the delay and moves the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))
        self.delays: list[float] = []

    def clock(self) -> float:
        return self.now

    def clock_ms(self) -> int:
        return round(self.now * 1000)

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.now += seconds


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[tuple[AppleStore, str, Path]]:
    async with apple_simulator(tmp_path) as (store, url):
        yield store, url, tmp_path / "apple" / "SubscriptionKey.p8"


def make_api(
    url: str, key_file: Path, fake: FakeTime | None = None, timeout: float = 5.0, **token_options: Any
) -> AppStoreApi:
    fake = fake or FakeTime()
    tokens = TokenMinter(
        load_api_key(key_file),
        token_options.get("key_id", KEY_ID),
        token_options.get("issuer", ISSUER_ID),
        token_options.get("bundle", BUNDLE_ID),
    )
    return AppStoreApi(
        httpx.AsyncClient(),
        tokens,
        production_url=f"{url}/apple/production",
        sandbox_url=f"{url}/apple/sandbox",
        timeout_seconds=timeout,
        retry=AppStoreApiRetries(attempts=4, base_delay=0.01, max_delay=0.05, max_retry_after=5.0),
        clock=fake.clock,
        sleep=fake.sleep,
    )


def test_token_claims_and_reuse(tmp_path: Path) -> None:
    from services.storesim.apple import create_store

    create_store(tmp_path)
    key = load_api_key(tmp_path / "apple" / "SubscriptionKey.p8")
    now = [time.time()]
    minter = TokenMinter(key, KEY_ID, ISSUER_ID, BUNDLE_ID, clock=lambda: now[0])
    token = minter.token()
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": KEY_ID, "typ": "JWT"}
    claims = jwt.decode(
        token, key.public_key(), algorithms=["ES256"], audience="appstoreconnect-v1", options={"verify_exp": False}
    )
    assert claims["iss"] == ISSUER_ID
    assert claims["bid"] == BUNDLE_ID
    assert 0 < claims["exp"] - claims["iat"] <= 3600
    now[0] += 20 * 60
    assert minter.token() == token, "reused until near expiry"
    now[0] += 6 * 60
    assert minter.token() != token, "re-minted near expiry"


async def test_transaction_info_and_jwt_checked_by_simulator(sim: tuple[AppleStore, str, Path]) -> None:
    store, url, key_file = sim
    txid, _ = store.buy("com.coinstore.coins.70", environment="Production")
    api = make_api(url, key_file)
    signed = await api.get_transaction_info(Environment.PRODUCTION, txid)
    assert jwt.decode(signed, options={"verify_signature": False})["transactionId"] == txid
    bad_options: list[dict[str, Any]] = [{"key_id": "OTHERKEY"}, {"bundle": "com.example.other"}, {"issuer": "x"}]
    for bad in bad_options:
        with pytest.raises(DomainError) as caught:
            await make_api(url, key_file, **bad).get_transaction_info(Environment.PRODUCTION, txid)
        assert caught.value.reason == "APP_STORE_AUTH_FAILED"
    await api.close()


async def test_not_found_and_sandbox_fallback(sim: tuple[AppleStore, str, Path]) -> None:
    store, url, key_file = sim
    txid, _ = store.buy("com.coinstore.coins.70", environment="Sandbox")
    api = make_api(url, key_file)
    with pytest.raises(DomainError) as caught:
        await api.get_transaction_info(Environment.PRODUCTION, txid)
    assert (caught.value.code.name, caught.value.reason) == ("NOT_FOUND", "TRANSACTION_NOT_FOUND")
    environment, _signed = await api.find_transaction(txid, [Environment.PRODUCTION, Environment.SANDBOX])
    assert environment is Environment.SANDBOX
    with pytest.raises(DomainError):
        await api.find_transaction(txid, [Environment.PRODUCTION])
    paths = [path for _method, path, _query in store.api_calls]
    assert paths[-3:] == [f"/apple/production/inApps/v1/transactions/{txid}"] * 1 + [
        f"/apple/sandbox/inApps/v1/transactions/{txid}",
        f"/apple/production/inApps/v1/transactions/{txid}",
    ]


async def test_429_honours_retry_after(sim: tuple[AppleStore, str, Path]) -> None:
    store, url, key_file = sim
    txid, _ = store.buy("com.coinstore.coins.70", environment="Production")
    fake = FakeTime()
    store.clock = fake.clock_ms  # Retry-After is a moment (UNIX ms): the store and the client share the clock
    store.inject(Fault(status=429, count=2, retry_after_ms=300))
    await make_api(url, key_file, fake).get_transaction_info(Environment.PRODUCTION, txid)
    # Each 429 waits until the moment Apple named, not the (0.01-0.05 s) backoff.
    assert fake.delays == pytest.approx([0.3, 0.3])
    # A Retry-After beyond what one call may wait → UNAVAILABLE at once.
    store.inject(Fault(status=429, count=1, retry_after_ms=60_000))
    fake = FakeTime()
    store.clock = fake.clock_ms
    with pytest.raises(DomainError) as caught:
        await make_api(url, key_file, fake).get_transaction_info(Environment.PRODUCTION, txid)
    assert (caught.value.code.name, caught.value.reason) == ("UNAVAILABLE", "APP_STORE_RATE_LIMITED")
    assert fake.delays == []


async def test_5xx_retries_then_unavailable(sim: tuple[AppleStore, str, Path]) -> None:
    store, url, key_file = sim
    txid, _ = store.buy("com.coinstore.coins.70", environment="Production")
    store.inject(Fault(status=503, count=2))
    await make_api(url, key_file).get_transaction_info(Environment.PRODUCTION, txid)
    calls = len(store.api_calls)
    store.inject(Fault(status=500, count=100))
    with pytest.raises(DomainError) as caught:
        await make_api(url, key_file).get_transaction_info(Environment.PRODUCTION, txid)
    assert (caught.value.code.name, caught.value.reason) == ("UNAVAILABLE", "APP_STORE_UNAVAILABLE")
    assert len(store.api_calls) - calls == 4


async def test_slow_answers_time_out_and_retry(sim: tuple[AppleStore, str, Path]) -> None:
    store, url, key_file = sim
    txid, _ = store.buy("com.coinstore.coins.70", environment="Production")
    # One answer slower than the timeout, then a healthy one (the timeout is generous for it).
    store.inject(Fault(delay_seconds=3.0, count=1))
    fake = FakeTime()
    calls = len(store.api_calls)
    await make_api(url, key_file, fake, timeout=2.0).get_transaction_info(Environment.PRODUCTION, txid)
    assert len(fake.delays) == 1  # the slow attempt was cut and retried once
    assert len(store.api_calls) - calls == 2
    # Every answer slow: each attempt is cut, so the call fails well before the answers would
    # come (without the timeout every attempt would wait them out and succeed).
    store.inject(Fault(delay_seconds=1.5, count=100))
    fake = FakeTime()
    with pytest.raises(DomainError) as caught:
        await asyncio.wait_for(
            make_api(url, key_file, fake, timeout=0.2).get_transaction_info(Environment.PRODUCTION, txid), 30
        )
    assert caught.value.reason == "APP_STORE_UNAVAILABLE"
    assert len(fake.delays) == 3


async def test_history_v2_pages_consumables_only(sim: tuple[AppleStore, str, Path]) -> None:
    store, url, key_file = sim
    ids = [store.buy("com.coinstore.coins.70", customer="c1", environment="Production")[0] for _ in range(45)]
    store.buy("com.coinstore.lifetime", customer="c1", environment="Production", product_type="Non-Consumable")
    store.buy("com.coinstore.coins.70", customer="someone-else", environment="Production")
    api = make_api(url, key_file)
    pages = [page async for page in api.transaction_history(Environment.PRODUCTION, ids[7])]
    assert [len(p.signed_transactions) for p in pages] == [20, 20, 5]
    seen = [
        jwt.decode(s, options={"verify_signature": False})["transactionId"]
        for p in pages
        for s in p.signed_transactions
    ]
    assert sorted(seen) == sorted(ids)
    queries = [q for _m, path, q in store.api_calls if "/v2/history/" in path]
    assert all(q.get("productType") == "CONSUMABLE" for q in queries)
    assert "revision" not in queries[0]
    assert queries[1]["revision"]


async def test_refund_and_notification_history_and_consumption(sim: tuple[AppleStore, str, Path]) -> None:
    store, url, key_file = sim
    ids = [store.buy("com.coinstore.coins.70", customer="c2", environment="Production")[0] for _ in range(3)]
    store.refund(ids[2])
    store.refund(ids[0], revocation_type="REFUND_PRORATED", percentage=50_000)
    api = make_api(url, key_file)
    page = await api.get_refund_history(Environment.PRODUCTION, ids[1])
    refunded = [jwt.decode(s, options={"verify_signature": False}) for s in page.signed_transactions]
    assert [r["transactionId"] for r in refunded] == [ids[2], ids[0]]
    assert refunded[1]["revocationPercentage"] == 50_000
    assert not page.has_more

    signed = store.sign({"notificationType": "REFUND", "notificationUUID": "u-1"})
    store.log_notification(signed, "REFUND", ids[2], "Production", "SUCCESS")
    now_ms = int(time.time() * 1000)
    history = await api.get_notification_history(
        Environment.PRODUCTION, now_ms - 86_400_000, now_ms + 1000, transaction_id=ids[2]
    )
    assert [item.signed_payload for item in history.items] == [signed]
    # Apple keeps 180 days of history; an earlier start is refused.
    with pytest.raises(DomainError, match="180 days"):
        await api.get_notification_history(Environment.PRODUCTION, 0, now_ms + 1000, transaction_id=ids[2])

    await api.send_consumption_information(
        Environment.PRODUCTION,
        ids[1],
        {
            "customerConsented": True,
            "sampleContentProvided": False,
            "deliveryStatus": "DELIVERED",
            "consumptionPercentage": 100_000,
        },
    )
    assert store.consumption[ids[1]][0]["deliveryStatus"] == "DELIVERED"
    with pytest.raises(DomainError) as caught:
        await api.send_consumption_information(
            Environment.PRODUCTION,
            ids[1],
            {"customerConsented": False, "sampleContentProvided": False, "deliveryStatus": "DELIVERED"},
        )
    assert caught.value.reason == "APP_STORE_REJECTED"
    await api.close()


async def test_faults_and_refunds_over_the_simulators_http_endpoints(sim: tuple[AppleStore, str, Path]) -> None:
    _store, url, key_file = sim
    async with httpx.AsyncClient() as client:
        bought = (await client.post(f"{url}/apple/buy", json={"productId": "com.coinstore.coins.70"})).json()
        txid = bought["transactionId"]
        refund = await client.post(
            f"{url}/apple/refund",
            json={"transactionId": txid, "revocationType": "REFUND_PRORATED", "revocationPercentage": 25_000},
        )
        revoked = jwt.decode(refund.json()["signedTransaction"], options={"verify_signature": False})
        assert (revoked["revocationType"], revoked["revocationPercentage"]) == ("REFUND_PRORATED", 25_000)
        reverse = await client.post(f"{url}/apple/refund/reverse", json={"transactionId": txid})
        assert "revocationDate" not in jwt.decode(
            reverse.json()["signedTransaction"], options={"verify_signature": False}
        )
        await client.post(f"{url}/apple/faults", json={"status": 503, "count": 1, "path": "/transactions/"})
    fake = FakeTime()
    await make_api(url, key_file, fake).get_transaction_info(Environment.PRODUCTION, txid)
    assert len(fake.delays) == 1
