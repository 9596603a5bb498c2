"""Each notification type from the store simulator to the wallet balance, with
real servers, a real wallet and a real Celery worker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.receipts.notifications.parse import APPLE, GOOGLE
from tests.notifications.system import System, credit_directly, running_system
from tests.support.tokens import Keys

PACK = "com.coinstore.coins.350"
PACKAGE = "com.coinstore.app"

pytestmark = pytest.mark.timeout(180)


def last_uuid(system: System, kind: str, transaction_id: str) -> str:
    found = [
        d.notification_uuid
        for d in system.notifier.deliveries.values()
        if d.notification_type == kind and d.transaction_id == transaction_id
    ]
    assert found, f"no {kind} sent for {transaction_id}"
    return found[-1]


async def test_apple_notifications_reach_the_wallet(database_url: str, keys: Keys, tmp_path: Path) -> None:
    async with running_system(database_url, keys, tmp_path, settings_extra={"APPLE_SEND_CONSUMPTION": "true"}) as s:
        token, _ = s.bind("fan-1")
        bought = await s.sim("/apple/buy", {"productId": PACK, "appAccountToken": token})
        txid = bought["transactionId"]
        assert await s.wait_processed(APPLE, last_uuid(s, "ONE_TIME_CHARGE", txid)) == "credited"
        assert await s.balance("fan-1") == 350

        refund = {"transactionId": txid, "revocationType": "REFUND_PRORATED", "revocationPercentage": 50_000}
        await s.sim("/apple/refund", refund)
        assert await s.wait_processed(APPLE, last_uuid(s, "REFUND", txid)) == "reversed"
        assert await s.balance("fan-1") == 175

        await s.sim("/apple/refund/reverse", {"transactionId": txid})
        assert await s.wait_processed(APPLE, last_uuid(s, "REFUND_REVERSED", txid)) == "restored"
        assert await s.balance("fan-1") == 350

        await s.sim("/apple/refund", {"transactionId": txid})
        assert await s.wait_processed(APPLE, last_uuid(s, "REFUND", txid)) == "reversed"
        assert await s.balance("fan-1") == 0

        request = {"notificationType": "CONSUMPTION_REQUEST", "transactionId": txid}
        await s.sim("/apple/notifications/send", request | {"consumptionRequestReason": "UNINTENDED_PURCHASE"})
        assert await s.wait_processed(APPLE, last_uuid(s, "CONSUMPTION_REQUEST", txid)) == "consumption_sent"
        sent = s.apple.consumption[txid]
        assert sent == [
            {
                "customerConsented": True,
                "sampleContentProvided": False,
                "deliveryStatus": "DELIVERED",
                "consumptionPercentage": 0,
            }
        ]
        await s.sim("/apple/notifications/send", {"notificationType": "REFUND_DECLINED", "transactionId": txid})
        assert await s.wait_processed(APPLE, last_uuid(s, "REFUND_DECLINED", txid)) == "recorded"

        # Bought with a token we never issued: recorded until an account claims it.
        stranger = await s.sim(
            "/apple/buy", {"productId": PACK, "appAccountToken": "0d1c0d1c-0000-4000-8000-00000000dead"}
        )
        assert await s.wait_processed(APPLE, last_uuid(s, "ONE_TIME_CHARGE", stranger["transactionId"])) == "recorded"
        assert [d.state for d in s.notifier.deliveries.values()] == ["delivered"] * len(s.notifier.deliveries)


async def test_same_notification_ten_times_and_the_app_racing_it_credit_once(
    database_url: str, keys: Keys, tmp_path: Path
) -> None:
    async with running_system(database_url, keys, tmp_path) as s:
        s.notifier.config.auto = False
        token, _ = s.bind("fan-2")
        bought = await s.sim("/apple/buy", {"productId": PACK, "appAccountToken": token})
        uuid_, _env, signed_payload = s.notifier.signed_payload("ONE_TIME_CHARGE", bought["transactionId"])

        async def deliver() -> int:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    s.webhook_url + "/notifications/apple/v2", json={"signedPayload": signed_payload}
                ) as reply,
            ):
                return reply.status

        async def app_reports() -> str:
            results = await s.components.apple.verify(
                account_id="fan-2",
                request_id="app-report-1",
                account_region="",
                signed_transaction=bought["signedTransaction"],
            )
            return results[0].outcome.value

        outcomes = await asyncio.gather(*(deliver() for _ in range(10)), app_reports())
        assert outcomes[:10] == [200] * 10
        assert outcomes[10] in ("credited", "already_credited")
        assert await s.wait_processed(APPLE, uuid_) in ("credited", "already_credited")
        await asyncio.sleep(0.5)
        assert await s.balance("fan-2") == 350
        history = await s.wallet.stub.ListTransactions(
            wpb.ListTransactionsRequest(account_id="fan-2"), metadata=s.wallet.md(), timeout=10
        )
        assert [t.coins_delta for t in history.transactions] == [350]


async def test_google_notifications_reach_the_wallet(database_url: str, keys: Keys, tmp_path: Path) -> None:
    async with running_system(database_url, keys, tmp_path) as s:
        await credit_directly(s.wallet, "fan-g", wpb.STORE_GOOGLE_PLAY, "tok-g1", 350)
        voided = {
            "version": "1.0",
            "packageName": PACKAGE,
            "eventTimeMillis": str(int(time.time() * 1000)),
            "voidedPurchaseNotification": {
                "purchaseToken": "tok-g1",
                "orderId": "GPA.3333-0000-0000-00001",
                "productType": 2,
                "refundType": 1,
            },
        }
        first = s.push.publish(voided)
        assert await s.wait_processed(GOOGLE, first) == "reversed"
        assert await s.balance("fan-g") == 0
        # Google notifies the same refund again (a new message): nothing moves.
        again = s.push.publish(voided)
        assert await s.wait_processed(GOOGLE, again) == "already_reversed"
        assert await s.balance("fan-g") == 0
        test = s.push.publish({"version": "1.0", "packageName": PACKAGE, "testNotification": {"version": "1.0"}})
        assert await s.wait_processed(GOOGLE, test) == "test"
        canceled = {
            "version": "1.0",
            "packageName": PACKAGE,
            "oneTimeProductNotification": {"version": "1.0", "notificationType": 2, "purchaseToken": "t2", "sku": PACK},
        }
        assert await s.wait_processed(GOOGLE, s.push.publish(canceled)) == "canceled"
        assert {d.state for d in s.push.deliveries.values()} == {"acked"}
