"""The webhook server on a real port with a real database: verified
notifications are stored once and acknowledged; everything else is refused
with the right status and nothing stored."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from services.receipts.notifications.parse import APPLE, GOOGLE
from services.storesim.apple import AppleStore
from services.storesim.pubsub import PubSubPush
from tests.receipts.notifications.apple_payloads import notification, transaction
from tests.receipts.notifications.conftest import PACKAGE, Sim, Webhook
from tests.receipts.notifications.system import serve
from tests.support.waiting import eventually

GOOGLE_PATH = "/notifications/google"
APPLE_PATH = "/notifications/apple/v2"


def rtdn(kind: str = "voidedPurchaseNotification", token: str | None = None, **fields: Any) -> dict[str, Any]:
    token = token or f"tok-{uuid.uuid4().hex}"
    bodies: dict[str, dict[str, Any]] = {
        "voidedPurchaseNotification": {"purchaseToken": token, "orderId": "GPA.1", "productType": 2, "refundType": 1},
        "oneTimeProductNotification": {
            "version": "1.0",
            "notificationType": 1,
            "purchaseToken": token,
            "sku": "coins_100",
        },
        "testNotification": {"version": "1.0"},
    }
    sub = {**bodies[kind], **fields}
    return {"version": "1.0", "packageName": PACKAGE, "eventTimeMillis": str(int(time.time() * 1000)), kind: sub}


def rows(webhook: Webhook) -> int:
    return sum(webhook.inbox.counts().values())


async def test_pubsub_push_from_the_simulator_is_stored_once(sim: Sim, webhook: Webhook) -> None:
    message_id = sim.push.publish(rtdn(token="tok-sim-1"))
    await eventually(lambda: sim.push.deliveries[message_id].state == "acked", "the push to be acked", 10)
    stored = webhook.inbox.get(GOOGLE, message_id)
    assert stored is not None
    assert stored.notification_type == "voidedPurchaseNotification"
    assert stored.store_transaction_id == "tok-sim-1"
    assert webhook.dispatched == [stored.id]


async def test_same_message_ten_times_concurrently_is_stored_and_queued_once(sim: Sim, webhook: Webhook) -> None:
    body = PubSubPush.envelope(rtdn(), "7000000000000001")
    headers = {"Authorization": f"Bearer {sim.push.token()}"}
    results = await asyncio.gather(*(webhook.post(GOOGLE_PATH, body, headers) for _ in range(10)))
    assert [status for status, _ in results] == [200] * 10
    assert sum('"stored"' in text for _, text in results) == 1
    assert rows(webhook) == 1
    assert len(webhook.dispatched) == 1


async def test_url_safe_unpadded_data_is_accepted(sim: Sim, webhook: Webhook) -> None:
    body = PubSubPush.envelope(rtdn(), "7000000000000002", urlsafe=True)
    status, _ = await webhook.post(GOOGLE_PATH, body, {"Authorization": f"Bearer {sim.push.token()}"})
    assert status == 200
    assert webhook.inbox.get(GOOGLE, "7000000000000002") is not None


def _forged_tokens(sim: Sim) -> dict[str, str]:
    now = int(time.time())
    stranger = PubSubPush(rsa.generate_private_key(public_exponent=65537, key_size=2048), sim.push.config)
    claims = {"aud": sim.push.config.audience, "iss": "https://accounts.google.com", "iat": now, "exp": now + 600}
    hs_header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": sim.push.kid}).encode()).rstrip(b"=")
    hs_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    return {
        "wrong audience": sim.push.token(aud="https://other.example/push"),
        "wrong issuer": sim.push.token(iss="https://login.example.com"),
        "wrong email": sim.push.token(email="someone@else.iam.gserviceaccount.com"),
        "unverified email": sim.push.token(email_verified=False),
        "expired": sim.push.token(iat=now - 7200, exp=now - 3600),
        "unknown key": stranger.token(),
        "HS256": f"{hs_header.decode()}.{hs_body.decode()}.c2lnbmF0dXJl",
    }


async def test_bad_tokens_are_refused_and_nothing_is_stored(sim: Sim, webhook: Webhook) -> None:
    body = PubSubPush.envelope(rtdn(), "7000000000000003")
    for why, token in _forged_tokens(sim).items():
        status, _ = await webhook.post(GOOGLE_PATH, body, {"Authorization": f"Bearer {token}"})
        assert status in (401, 403), why
    status, _ = await webhook.post(GOOGLE_PATH, body)
    assert status == 401
    assert rows(webhook) == 0
    assert webhook.dispatched == []
    text = webhook.metrics.registry.get_sample_value(
        "coinstore_notifications_received_total", {"source": "google", "status": "403"}
    )
    assert text == len(_forged_tokens(sim))


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"[]", 400),
        ({"message": "nope"}, 400),
        ({"message": {"messageId": "1", "data": "%%%not-base64%%%"}}, 400),
        ({"message": {"messageId": "1", "data": base64.b64encode(b"[1,2]").decode()}}, 400),
        ({"message": {"data": base64.b64encode(json.dumps(rtdn()).encode()).decode()}}, 400),
        ({"message": {"messageId": "1", "data": base64.b64encode(b'{"packageName":"com.other"}').decode()}}, 403),
        (
            {
                "message": {
                    "messageId": "1",
                    "data": base64.b64encode(
                        json.dumps(rtdn("oneTimeProductNotification", notificationType="x")).encode()
                    ).decode(),
                }
            },
            400,
        ),
        (b"x" * (1024 * 1024 + 1), 413),
    ],
)
async def test_malformed_google_bodies(sim: Sim, webhook: Webhook, body: Any, status: int) -> None:
    got, _ = await webhook.post(GOOGLE_PATH, body, {"Authorization": f"Bearer {sim.push.token()}"})
    assert got == status
    assert rows(webhook) == 0


async def test_unknown_notification_kind_is_acked(sim: Sim, webhook: Webhook) -> None:
    notification_body = {"version": "1.0", "packageName": PACKAGE, "brandNewNotification": {"x": 1}}
    body = PubSubPush.envelope(notification_body, "7000000000000004")
    status, _ = await webhook.post(GOOGLE_PATH, body, {"Authorization": f"Bearer {sim.push.token()}"})
    assert status == 200
    stored = webhook.inbox.get(GOOGLE, "7000000000000004")
    assert stored is not None
    assert stored.notification_type == "unknown"


async def test_simulator_redelivers_until_acknowledged(sim: Sim) -> None:
    answers = [503, 500, 200, 200]
    seen: list[str] = []

    async def flaky(request: web.Request) -> web.Response:
        seen.append((await request.json())["message"]["messageId"])
        return web.Response(status=answers[len(seen) - 1])

    app = web.Application()
    app.router.add_post("/push", flaky)
    async with serve(app) as url:
        sim.push.config.push_endpoint = f"{url}/push"
        message_id = sim.push.publish(rtdn())
        await eventually(lambda: sim.push.deliveries[message_id].state == "acked", "the push to be acked", 10)
        assert sim.push.deliveries[message_id].attempts == [503, 500, 200]
        assert seen == [message_id] * 3
        sim.push.config.lose_next = 1
        lost = sim.push.publish(rtdn())
        # The message published after it arrives: the lost one never did.
        after = sim.push.publish(rtdn())
        await eventually(lambda: sim.push.deliveries[after].state == "acked", "the later push to be acked", 10)
        assert sim.push.deliveries[lost].state == "lost"
        assert seen == [message_id] * 3 + [after]


async def test_simulator_without_a_push_subscription_pushes_nothing(sim: Sim) -> None:
    pushed: list[str] = []

    async def endpoint(request: web.Request) -> web.Response:
        pushed.append((await request.json())["message"]["messageId"])
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/push", endpoint)
    async with serve(app) as url:
        sim.push.config.push_endpoint = ""
        quiet = sim.push.publish(rtdn())
        sim.push.config.push_endpoint = f"{url}/push"
        # The quiet message started no delivery at all: nothing but the later one reaches the endpoint.
        later = sim.push.publish(rtdn())
        await eventually(lambda: sim.push.deliveries[later].state == "acked", "the later push to be acked", 10)
        assert (sim.push.deliveries[quiet].state, sim.push.deliveries[quiet].attempts) == ("unsubscribed", [])
        assert pushed == [later]


# --- Apple -------------------------------------------------------------------------------------------------


async def test_apple_notification_is_verified_and_stored(apple_store: AppleStore, webhook: Webhook) -> None:
    pki = apple_store.sign
    signed = pki(transaction("2000000001", app_account_token=str(uuid.uuid4())))
    body = notification(pki, "REFUND", signed, notification_uuid="aaaaaaaa-0000-4000-8000-000000000001")
    for _ in range(3):
        status, _ = await webhook.post(APPLE_PATH, body)
        assert status == 200
    stored = webhook.inbox.get(APPLE, "aaaaaaaa-0000-4000-8000-000000000001")
    assert stored is not None
    assert stored.store_transaction_id == "2000000001"
    assert stored.payload["transaction"]["productId"] == "coins_100"
    assert "signedTransactionInfo" not in stored.payload["notification"]["data"]
    assert rows(webhook) == 1
    assert len(webhook.dispatched) == 1


async def test_apple_test_notification_is_acked(apple_store: AppleStore, webhook: Webhook) -> None:
    pki = apple_store.sign
    status, _ = await webhook.post(APPLE_PATH, notification(pki, "TEST", None))
    assert status == 200
    stale = {"notificationType": "TEST", "notificationUUID": str(uuid.uuid4()), "version": "2.0", "signedDate": 1}
    status, _ = await webhook.post(APPLE_PATH, {"signedPayload": pki(stale)})
    assert status == 401  # signed when the certificates were not valid


def _tamper(jws: str, **changes: Any) -> str:
    header, payload, signature = jws.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    decoded.update(changes)
    forged = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


async def test_forged_and_foreign_apple_payloads_are_refused(
    apple_store: AppleStore, foreign_store: AppleStore, webhook: Webhook
) -> None:
    other = foreign_store.sign
    pki = apple_store.sign
    good_tx = pki(transaction("2000000002"))
    good = notification(pki, "REFUND", good_tx)
    cases: dict[str, tuple[dict[str, Any], set[int]]] = {
        "forged payload": (
            {"signedPayload": _tamper(good["signedPayload"], notificationType="ONE_TIME_CHARGE")},
            {401},
        ),
        "wrong root": (notification(other, "REFUND", other(transaction("2000000002"))), {401}),
        "forged transaction": (notification(pki, "REFUND", _tamper(good_tx, quantity=50)), {401}),
        "wrong bundle": (notification(pki, "REFUND", good_tx, bundle_id="com.evil.app"), {403}),
        "transaction of another bundle": (
            notification(pki, "REFUND", pki(transaction("2000000002", bundle_id="com.evil.app"))),
            {403},
        ),
        "production, wrong app id": (
            notification(
                pki,
                "REFUND",
                pki(transaction("2000000002", environment="Production")),
                environment="Production",
                app_apple_id=999,
            ),
            {403},
        ),
        "Xcode environment": (
            notification(pki, "REFUND", pki(transaction("2000000002", environment="Xcode")), environment="Xcode"),
            {403},
        ),
        "not JSON": (b"signedPayload=abc", {400}),  # type: ignore[dict-item]
        "no payload": ({"signedPayload": ""}, {400}),
        "not a JWS": ({"signedPayload": "abc.def"}, {400}),
        "no transaction": (notification(pki, "REFUND", None), {400}),
    }
    for why, (body, expected) in cases.items():
        status, _ = await webhook.post(APPLE_PATH, body)
        assert status in expected, why
    assert rows(webhook) == 0
    status, _ = await webhook.post(APPLE_PATH, b"{" + b" " * (1024 * 1024) + b"}")
    assert status == 413
