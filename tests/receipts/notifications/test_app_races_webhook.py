"""The app path racing the webhook path for the same purchase, App Store and Google
Play: for each purchase two threads are released together by a barrier, one
calling VerifyApplePurchase / VerifyGooglePurchase over a real gRPC socket, the
other posting the store's notification to the webhook over real HTTP; a real
Celery worker processes the notification. Each purchase is credited once."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from coinstore.receipts.v1 import receipt_service_pb2_grpc as pb_grpc
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.receipts.notifications.parse import APPLE, GOOGLE
from services.receipts.wiring import build_host
from services.storesim.pubsub import Delivery
from tests.receipts.notifications.system import System, running_system
from tests.receipts.support import runtime_for
from tests.support.tokens import Keys

PACKS = {APPLE: "com.coinstore.coins.350", GOOGLE: "coins_350"}
ROUNDS = 4
CREDITED = {pb.PURCHASE_STATE_CREDITED, pb.PURCHASE_STATE_ALREADY_CREDITED}

pytestmark = pytest.mark.timeout(180)


@dataclass
class Race:
    """One purchase, reported both ways."""

    source: str
    external_id: str
    app_call: Callable[[Any], Any]
    webhook: urllib.request.Request


def run_race(race: Race, address: str) -> tuple[int, int]:
    """Release the app call and the webhook post together; (purchase state, HTTP status)."""
    barrier = threading.Barrier(2)
    answers: dict[str, int] = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ReceiptServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)

        def app() -> None:
            barrier.wait(10)
            reply = race.app_call(stub)
            purchases = reply.purchases if race.source == APPLE else [reply.purchase]
            answers["app"] = purchases[0].state

        def store() -> None:
            barrier.wait(10)
            with urllib.request.urlopen(race.webhook, timeout=30) as response:
                answers["webhook"] = response.status

        threads = [threading.Thread(target=app), threading.Thread(target=store)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    return answers["app"], answers["webhook"]


def _verify_apple(stub: Any, request: pb.VerifyApplePurchaseRequest, md: Any) -> Any:
    return stub.VerifyApplePurchase(request, metadata=md, timeout=30)


def _verify_google(stub: Any, request: pb.VerifyGooglePurchaseRequest, md: Any) -> Any:
    return stub.VerifyGooglePurchase(request, metadata=md, timeout=30)


def post(url: str, body: dict[str, Any], **headers: str) -> urllib.request.Request:
    return urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json", **headers}
    )


async def lost_delivery(s: System, token: str) -> Delivery:
    """The RTDN the simulator published for ``token`` and was told to lose."""
    deadline = time.monotonic() + 10
    while True:
        for delivery in s.push.deliveries.values():
            if delivery.notification.get("oneTimeProductNotification", {}).get("purchaseToken") == token:
                assert delivery.state == "lost"
                return delivery
        assert time.monotonic() < deadline, "the simulator published no RTDN"
        await asyncio.sleep(0.02)


async def races(s: System, md: tuple[tuple[str, str], ...]) -> list[Race]:
    apple_token, obfuscated = await s.bind("fan-race")
    # The notifications are sent by the test, at the moment it chooses.
    s.notifier.config.auto = False
    found: list[Race] = []
    for n in range(ROUNDS):
        bought = await s.sim("/apple/buy", {"productId": PACKS[APPLE], "appAccountToken": apple_token})
        uuid_, _env, signed_payload = s.notifier.signed_payload("ONE_TIME_CHARGE", bought["transactionId"])
        apple = pb.VerifyApplePurchaseRequest(
            request_id=f"apple-{n}", account_id="fan-race", signed_transaction=bought["signedTransaction"]
        )
        found.append(
            Race(
                APPLE,
                uuid_,
                partial(_verify_apple, request=apple, md=md),
                post(s.webhook_url + "/notifications/apple/v2", {"signedPayload": signed_payload}),
            )
        )
        s.push.config.lose_next = 1
        play = await s.sim("/google/sim/purchases", {"productId": PACKS[GOOGLE], "obfuscatedAccountId": obfuscated})
        token = play["purchaseToken"]
        delivery = await lost_delivery(s, token)
        message_id = f"race-{n}-{delivery.message_id}"
        google = pb.VerifyGooglePurchaseRequest(
            request_id=f"google-{n}", account_id="fan-race", product_id=PACKS[GOOGLE], purchase_token=token
        )
        found.append(
            Race(
                GOOGLE,
                message_id,
                partial(_verify_google, request=google, md=md),
                post(
                    s.webhook_url + "/notifications/google",
                    s.push.envelope(delivery.notification, message_id),
                    Authorization=f"Bearer {s.push.token()}",
                ),
            )
        )
    return found


async def test_app_racing_the_webhook_credits_each_purchase_once(database_url: str, keys: Keys, tmp_path: Path) -> None:
    async with running_system(database_url, keys, tmp_path) as s:
        runtime = runtime_for(s.settings)
        host = build_host(s.components, runtime, port=0)
        port = await host.start()
        try:
            md = keys.metadata("purchases:verify", subject="app-backend")
            found = await races(s, md)
            loop = asyncio.get_running_loop()
            # Threads of their own: the loop's default executor serves the webhook.
            with ThreadPoolExecutor(len(found)) as pool:
                answers = await asyncio.gather(
                    *(loop.run_in_executor(pool, run_race, race, f"127.0.0.1:{port}") for race in found)
                )
            for race, (state, status) in zip(found, answers, strict=True):
                assert state in CREDITED, race.source
                assert status == 200, race.source
                assert await s.wait_processed(race.source, race.external_id) in ("credited", "already_credited")
        finally:
            await host.stop()
            runtime.database.close()
        history = await s.wallet.stub.ListTransactions(
            wpb.ListTransactionsRequest(account_id="fan-race", page_size=100), metadata=s.wallet.md(), timeout=10
        )
        credits = Counter(t.reference for t in history.transactions if t.kind == wpb.TRANSACTION_KIND_PURCHASE)
        assert len(credits) == 2 * ROUNDS
        assert set(credits.values()) == {1}
        assert await s.balance("fan-race") == 2 * ROUNDS * 350
