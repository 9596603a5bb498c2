"""Play notifications ask Google once, take 404/410 as the purchase's final state,
and retry a partial refund read before Google updated refundableQuantity until it
can be applied, once. Through the Play simulator (whose request log counts the
API calls) and the real wallet."""

from __future__ import annotations

from datetime import UTC, datetime

from services.storesim.google import new_purchase_token
from tests.receipts.notifications.conftest import Core
from tests.receipts.notifications.test_handle import GOOGLE_PACK, Harness, bind
from tests.receipts.notifications.test_handle import harness as harness  # the fixture
from tests.receipts.notifications.test_webhooks import rtdn


def reads_of(core: Core, token: str) -> int:
    """The Android Publisher GETs of ``token`` so far."""
    return sum(1 for method, path in core.play.requests if method == "GET" and token in path)


def test_a_purchase_notification_queries_google_once(harness: Harness, core: Core) -> None:
    _, obfuscated = bind(harness, "fan-once")
    token = core.play.buy(GOOGLE_PACK, account_id=obfuscated).token
    before = reads_of(core, token)
    assert harness.process(harness.store_google(rtdn("oneTimeProductNotification", token, sku=GOOGLE_PACK))) == (
        "credited"
    )
    assert reads_of(core, token) - before == 1
    assert core.ledger("fan-once") == [(token, 70)]


def test_404_and_410_are_the_purchase_final_state_not_failures(harness: Harness, core: Core) -> None:
    unknown = new_purchase_token()
    row = harness.store_google(rtdn("oneTimeProductNotification", unknown, sku=GOOGLE_PACK))
    assert harness.process(row) == "purchase_not_found"
    assert harness.inbox.outcome(row)[:2] == ("processed", "purchase_not_found")
    _, obfuscated = bind(harness, "fan-gone")
    expired = core.play.buy(GOOGLE_PACK, account_id=obfuscated).token
    core.play.expire(expired)
    row = harness.store_google(rtdn("oneTimeProductNotification", expired, sku=GOOGLE_PACK))
    assert harness.process(row) == "purchase_token_expired"
    partial = harness.store_google(rtdn("voidedPurchaseNotification", expired, refundType=2))
    assert harness.process(partial) == "purchase_token_expired"
    assert harness.inbox.counts() == {"processed": 3}
    assert core.ledger("fan-gone") == []


def test_a_partial_refund_read_too_early_moves_nothing_and_is_applied_once_later(harness: Harness, core: Core) -> None:
    _, obfuscated = bind(harness, "fan-early")
    token = core.play.buy(GOOGLE_PACK, account_id=obfuscated, quantity=3).token
    assert harness.process(harness.store_google(rtdn("oneTimeProductNotification", token, sku=GOOGLE_PACK))) == (
        "credited"
    )
    # The RTDN arrives before Google's refundableQuantity says anything was refunded.
    row = harness.store_google(rtdn("voidedPurchaseNotification", token, refundType=2))
    outcome, retry_in = harness.processor.process(row)
    assert (outcome, harness.inbox.outcome(row)[0]) == ("failed", "failed")
    assert retry_in is not None
    assert core.ledger("fan-early") == [(token, 210)]
    assert "refundableQuantity" in harness.inbox.attempt_errors(row)[0]["error"]
    core.play.refund(token, 1)
    assert row in harness.inbox.due(datetime.now(UTC) + retry_in, harness.inbox.policy.default.cap)
    assert harness.process(row) == "reversed"
    assert harness.process(row) == "skipped"
    # The same refund notified again moves nothing more.
    assert harness.process(harness.store_google(rtdn("voidedPurchaseNotification", token, refundType=2))) == (
        "already_reversed"
    )
    assert core.ledger("fan-early") == [(token, 210), (token, -70)]
