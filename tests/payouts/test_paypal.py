"""The PayPal Payouts adapter against the simulator over real HTTP: OAuth caching,
exactly-once submission under 5xx, timeouts and duplicates, paging, unclaimed items."""

from __future__ import annotations

import httpx
import pytest

from services.common.catalog import from_minor
from services.payouts.domain.model import PayoutLine
from services.payouts.domain.ports import ItemOutcome, ProviderUnavailable
from services.payouts.paypal import PayPalProvider
from tests.payouts.harness import PayPalSimServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(count: int, prefix: str = "co", receiver: str = "") -> list[PayoutLine]:
    return [PayoutLine(f"{prefix}{i}", 1, receiver or f"r{i}@example.com", 1234 + i, "USD") for i in range(count)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


# Far beyond any healthy call to a local simulator, however busy the machine: a timeout
# in these tests is the simulator stalling on purpose, never a slow CI runner.
TIMEOUT_SECONDS = 30.0


@pytest.fixture
def provider(paypal: PayPalSimServer, clock: Clock) -> PayPalProvider:
    return PayPalProvider(paypal.api_url, "coinstore-dev", "coinstore-dev-secret", TIMEOUT_SECONDS, monotonic=clock)


def test_amounts_are_decimal_strings() -> None:
    assert from_minor(5000, "USD") == "50.00"
    assert from_minor(7, "USD") == "0.07"
    assert from_minor(7000, "JPY") == "7000"


def test_token_is_cached_until_it_expires(provider: PayPalProvider, paypal: PayPalSimServer, clock: Clock) -> None:
    provider.submit("tok-1", lines(1, "a"))
    provider.submit("tok-2", lines(1, "b"))
    assert len(paypal.sim.tokens) == 1
    clock.now += 32_400
    provider.submit("tok-3", lines(1, "c"))
    assert len(paypal.sim.tokens) == 2
    # A token the server no longer knows is renewed once, transparently.
    paypal.sim.tokens.clear()
    provider.submit("tok-4", lines(1, "d"))
    assert len(paypal.payments()["payments"]) == 4


def test_bad_credentials_are_retried_never_a_rejection(paypal: PayPalSimServer) -> None:
    # A rejection fails the items and returns their diamonds; refused credentials say
    # nothing about an earlier submission of the same batch, so they must stay retryable.
    wrong = PayPalProvider(paypal.api_url, "coinstore-dev", "nope", TIMEOUT_SECONDS)
    with pytest.raises(ProviderUnavailable, match="credentials"):
        wrong.submit("x", lines(1))
    assert paypal.payments()["payments"] == []


def test_submit_then_page_through_results(provider: PayPalProvider, paypal: PayPalSimServer) -> None:
    batch_id = provider.submit("big-1", lines(2_100))
    result = provider.batch(batch_id)
    assert len(result.items) == 2_100
    assert {i.outcome for i in result.items} == {ItemOutcome.PAID}
    assert {i.sender_item_id for i in result.items} == {f"co{i}-1" for i in range(2_100)}
    assert all(i.transaction_id and i.provider_item_id for i in result.items)
    amounts = {p["sender_item_id"]: p["amount"] for p in paypal.payments()["payments"]}
    assert amounts["co0-1"] == {"currency": "USD", "value": "12.34"}


def test_duplicate_sender_batch_id_returns_the_original(provider: PayPalProvider, paypal: PayPalSimServer) -> None:
    first = provider.submit("dup-1", lines(3))
    assert provider.submit("dup-1", lines(3)) == first
    report = paypal.payments()
    assert len(report["payments"]) == 3
    assert report["duplicates"] == 1


def test_server_error_pays_nothing_and_is_retryable(provider: PayPalProvider, paypal: PayPalSimServer) -> None:
    paypal.faults(submit_errors=1)
    with pytest.raises(ProviderUnavailable):
        provider.submit("e-1", lines(2))
    assert paypal.payments()["payments"] == []
    provider.submit("e-1", lines(2))
    assert len(paypal.payments()["payments"]) == 2


def test_timeout_after_paying_then_retry_pays_once(paypal: PayPalSimServer) -> None:
    # The answer never comes (the simulator stalls for minutes), so the client's timeout
    # fires whatever the load; it only needs to be longer than a healthy call.
    impatient = PayPalProvider(paypal.api_url, "coinstore-dev", "coinstore-dev-secret", 3.0)
    paypal.faults(submit_timeouts=1, stall_seconds=600)
    with pytest.raises(ProviderUnavailable, match="ReadTimeout"):
        impatient.submit("t-1", lines(2))
    assert len(paypal.payments()["payments"]) == 2
    batch_id = impatient.submit("t-1", lines(2))
    assert {p["payout_batch_id"] for p in paypal.payments()["payments"]} == {batch_id}
    assert len(paypal.payments()["payments"]) == 2


def test_status_errors_are_retryable(provider: PayPalProvider, paypal: PayPalSimServer) -> None:
    batch_id = provider.submit("s-1", lines(1))
    paypal.faults(status_errors=1)
    with pytest.raises(ProviderUnavailable):
        provider.batch(batch_id)
    assert provider.batch(batch_id).items[0].outcome is ItemOutcome.PAID


def test_item_outcomes_and_unclaimed_cancel(provider: PayPalProvider, paypal: PayPalSimServer) -> None:
    # Pending until the test says otherwise (not for half a second, which a busy machine can outlast).
    paypal.faults(
        final_delay_seconds=3600,
        receiver_outcomes={"lost@example.com": "UNCLAIMED", "bad@example.com": "FAILED:RECEIVER_ACCOUNT_LOCKED"},
    )
    batch_id = provider.submit(
        "o-1",
        [
            PayoutLine("a", 1, "lost@example.com", 100, "USD"),
            PayoutLine("b", 1, "bad@example.com", 100, "USD"),
            PayoutLine("c", 1, "ok@example.com", 100, "USD"),
        ],
    )
    assert {i.outcome for i in provider.batch(batch_id).items} == {ItemOutcome.PENDING}
    paypal.faults(final_delay_seconds=0)
    items = {i.sender_item_id: i for i in provider.batch(batch_id).items}
    assert items["a-1"].outcome is ItemOutcome.UNCLAIMED
    assert (items["b-1"].outcome, items["b-1"].reason) == (ItemOutcome.FAILED, "RECEIVER_ACCOUNT_LOCKED")
    assert items["c-1"].outcome is ItemOutcome.PAID
    assert provider.cancel_unclaimed(items["a-1"].provider_item_id)
    assert not provider.cancel_unclaimed(items["a-1"].provider_item_id)
    assert not provider.cancel_unclaimed(items["c-1"].provider_item_id)
    after = {i.sender_item_id: i for i in provider.batch(batch_id).items}
    assert (after["a-1"].outcome, after["a-1"].status) == (ItemOutcome.FAILED, "RETURNED")


def test_simulator_speaks_paypal_errors(paypal: PayPalSimServer, provider: PayPalProvider) -> None:
    with pytest.raises(ValueError, match="15000"):
        provider.submit("too-many", lines(15_001))
    token = httpx.post(
        f"{paypal.api_url}/v1/oauth2/token",
        auth=("coinstore-dev", "coinstore-dev-secret"),
        data={"grant_type": "client_credentials"},
        timeout=TIMEOUT_SECONDS,
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    item = {"recipient_type": "EMAIL", "amount": {"value": "1.00", "currency": "USD"}, "receiver": "a@b.co"}
    body = {"sender_batch_header": {"sender_batch_id": "x"}, "items": [item] * 15_001}
    reply = httpx.post(f"{paypal.api_url}/v1/payments/payouts", json=body, headers=headers, timeout=TIMEOUT_SECONDS)
    assert reply.status_code == 400
    assert reply.json()["name"] == "VALIDATION_ERROR"
    bad = {
        "sender_batch_header": {"sender_batch_id": "y"},
        "items": [{**item, "amount": {"value": "1.005", "currency": "USD"}}],
    }
    reply = httpx.post(f"{paypal.api_url}/v1/payments/payouts", json=bad, headers=headers, timeout=TIMEOUT_SECONDS)
    assert reply.status_code == 400
    assert reply.json()["details"][0]["field"] == "items[0].amount.value"
    nope = f"{paypal.api_url}/v1/payments/payouts/NOPE"
    assert httpx.get(nope, headers=headers, timeout=TIMEOUT_SECONDS).status_code == 404
    assert httpx.get(nope, timeout=TIMEOUT_SECONDS).status_code == 401
    assert paypal.payments()["payments"] == []
