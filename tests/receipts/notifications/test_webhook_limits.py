"""The webhook listener's limits through real HTTP: deep JSON is 400 (it used to
be 500), a body not sent in time is 408, too many requests at once get 503 with
Retry-After, a large body 413, an Apple notification older than the accepted age
403 and counted; the listener stays up and logs each client's address."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from services.common.db import Database
from services.receipts.notifications.parse import APPLE
from services.receipts.notifications.webhooks import WebhookLimits
from services.storesim.apple import AppleStore
from tests.receipts.notifications.apple_payloads import notification, transaction
from tests.receipts.notifications.conftest import Sim, Webhook, running_webhook
from tests.receipts.notifications.test_webhooks import APPLE_PATH, GOOGLE_PATH, rows

DEEP = 100_000


def good_apple(store: AppleStore, **options: object) -> dict[str, object]:
    signed = store.sign(transaction(str(uuid.uuid4().int % 10**12)))
    return notification(store.sign, "REFUND", signed, **options)  # type: ignore[arg-type]


async def raw_request(port: int, head: bytes, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    return reader, writer


def post_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def port_of(webhook: Webhook) -> int:
    return int(webhook.url.rsplit(":", 1)[1])


@pytest.fixture
async def tight(receipts_db: Database, sim: Sim, apple_store: AppleStore) -> AsyncIterator[Webhook]:
    limits = WebhookLimits(max_body_bytes=64 * 1024, read_timeout_seconds=0.5)
    async with running_webhook(receipts_db, sim, apple_store, limits) as running:
        yield running


async def test_deeply_nested_bodies_are_400_and_the_listener_stays_up(
    sim: Sim, webhook: Webhook, apple_store: AppleStore
) -> None:
    token = {"Authorization": f"Bearer {sim.push.token()}"}
    deep = b"[" * DEEP + b"]" * DEEP
    deep_data = base64.b64encode(b'{"a":' * 40 + b"1" + b"}" * 40).decode()
    cases = [
        (APPLE_PATH, b'{"signedPayload": ' + deep + b"}", {}),
        (GOOGLE_PATH, deep, token),
        (GOOGLE_PATH, json.dumps({"message": {"messageId": "9", "data": deep_data}}).encode(), token),
    ]
    for path, body, headers in cases:
        status, text = await webhook.post(path, body, headers)
        assert (status, "deeper than 32" in text) == (400, True), (path, text[:200])
    assert rows(webhook) == 0
    status, _ = await webhook.post(APPLE_PATH, good_apple(apple_store))
    assert status == 200


async def test_a_body_not_sent_in_time_is_408(tight: Webhook) -> None:
    reader, writer = await raw_request(port_of(tight), post_head(GOOGLE_PATH, 100), b'{"message":')
    try:
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 408"), status_line


@pytest.fixture
async def one_at_a_time(receipts_db: Database, sim: Sim, apple_store: AppleStore) -> AsyncIterator[Webhook]:
    limits = WebhookLimits(read_timeout_seconds=30, max_concurrent_requests=1)
    async with running_webhook(receipts_db, sim, apple_store, limits) as running:
        yield running


async def test_requests_beyond_the_cap_get_503_with_retry_after(
    one_at_a_time: Webhook, apple_store: AppleStore
) -> None:
    webhook = one_at_a_time

    async def post_until(status: int) -> aiohttp.ClientResponse:
        async with aiohttp.ClientSession() as session:
            for _ in range(400):
                async with session.post(webhook.url + APPLE_PATH, json=good_apple(apple_store)) as response:
                    if response.status == status:
                        return response
                await asyncio.sleep(0.01)
        raise AssertionError(f"never answered {status}")

    # One request holds the only slot while its body trickles in.
    _reader, writer = await raw_request(port_of(webhook), post_head(GOOGLE_PATH, 100), b"{")
    try:
        busy = await post_until(503)
        assert busy.headers["Retry-After"] == "1"
    finally:
        writer.close()
    # Its sender hangs up: the slot is free again.
    await post_until(200)
    refused = webhook.metrics.registry.get_sample_value(
        "coinstore_notifications_received_total", {"source": "apple", "status": "503"}
    )
    assert refused is not None
    assert refused >= 1
    # The hung-up sender was answered like any bad request (never an unhandled error).
    hung_up = webhook.metrics.registry.get_sample_value(
        "coinstore_notifications_received_total", {"source": "google", "status": "400"}
    )
    assert hung_up == 1


async def test_a_body_over_the_size_limit_is_413(tight: Webhook) -> None:
    status, _ = await tight.post(GOOGLE_PATH, b"x" * (64 * 1024 + 1))
    assert status == 413


async def test_old_apple_notifications_are_refused_and_counted(
    webhook: Webhook, apple_store: AppleStore, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC)
    with caplog.at_level(logging.INFO, logger="services.receipts.notifications.webhooks"):
        old = good_apple(apple_store, signed_date=now - timedelta(hours=168, minutes=1))
        status, text = await webhook.post(APPLE_PATH, old)
        assert status == 403, text
        assert rows(webhook) == 0
        # Apple's last retry (about 6.5 days) is still within the default age.
        retried = good_apple(apple_store, signed_date=now - timedelta(hours=160), notification_uuid=str(uuid.uuid4()))
        status, _ = await webhook.post(APPLE_PATH, retried)
        assert status == 200
    too_old = webhook.metrics.registry.get_sample_value("coinstore_notifications_too_old_total", {"source": APPLE})
    assert too_old == 1
    clients = {getattr(record, "client", None) for record in caplog.records if record.msg.startswith("notification")}
    assert clients == {"127.0.0.1"}
