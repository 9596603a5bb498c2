"""Each notification type from the store simulator to the wallet balance, with
real servers, a real wallet and a real Celery worker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common.loop import OnLoop
from services.receipts.apple.consumption import ConsentRepository
from services.receipts.notifications.handle import Refused
from services.receipts.notifications.parse import APPLE, GOOGLE
from services.receipts.notifications.repository import StoredNotification
from services.receipts.purchases.model import Claim
from services.receipts.wiring import notification_handler
from tests.receipts.notifications.system import System, running_system
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
        token, _ = await s.bind("fan-1")
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

        # Apple is answered only for an account whose consent the app backend recorded.
        ConsentRepository(s.components.database).record("fan-1", True, datetime.now(UTC))
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
    dispatched: list[int] = []

    def counting(dispatch: Callable[[int], None]) -> Callable[[int], None]:
        def wrapped(notification_id: int) -> None:
            dispatched.append(notification_id)
            dispatch(notification_id)

        return wrapped

    async with running_system(database_url, keys, tmp_path, dispatch_wrapper=counting) as s:
        s.notifier.config.auto = False
        token, _ = await s.bind("fan-2")
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
                Claim("fan-2", "app-report-1"),
                signed_transaction=bought["signedTransaction"],
            )
            return results[0].outcome.value

        outcomes = await asyncio.gather(*(deliver() for _ in range(10)), app_reports())
        assert outcomes[:10] == [200] * 10
        assert outcomes[10] in ("credited", "already_credited")
        assert await s.wait_processed(APPLE, uuid_) in ("credited", "already_credited")
        # Every delivery has been answered, and each answer follows its row's commit and dispatch:
        # one row, queued once, processed once; no other work is in flight.
        stored = s.inbox.get(APPLE, uuid_)
        assert stored is not None
        assert dispatched == [stored.id]
        assert s.inbox.counts() == {"processed": 1}
        assert stored.attempts == 1
        assert await s.balance("fan-2") == 350
        history = await s.wallet.stub.ListTransactions(
            wpb.ListTransactionsRequest(account_id="fan-2"), metadata=s.wallet.md(), timeout=10
        )
        assert [t.coins_delta for t in history.transactions] == [350]


async def test_google_notifications_reach_the_wallet(database_url: str, keys: Keys, tmp_path: Path) -> None:
    async with running_system(database_url, keys, tmp_path) as s:
        _, obfuscated = await s.bind("fan-g")
        bought = await s.sim("/google/sim/purchases", {"productId": "coins_350", "obfuscatedAccountId": obfuscated})
        token = bought["purchaseToken"]
        assert await s.wait_processed(GOOGLE, _message(s, token, "oneTimeProductNotification")) == "credited"
        assert await s.balance("fan-g") == 350

        # Three packs, refunded one at a time: two partial refunds, then the last one (a full refund).
        three = await s.sim(
            "/google/sim/purchases", {"productId": "coins_350", "obfuscatedAccountId": obfuscated, "quantity": 3}
        )
        token3 = three["purchaseToken"]
        await s.wait_balance("fan-g", 350 + 1050)
        for expected in (350 + 700, 350 + 350, 350):
            await s.sim(f"/google/sim/purchases/{token3}/refund", {"quantity": 1})
            await s.wait_balance("fan-g", expected)
        await s.sim(f"/google/sim/purchases/{token}/refund", {})
        await s.wait_balance("fan-g", 0)
        outcomes = [
            await s.wait_processed(GOOGLE, m)
            for m, d in s.push.deliveries.items()
            if "voidedPurchaseNotification" in d.notification
        ]
        assert outcomes == ["reversed"] * 4

        # A purchase with someone else's obfuscated id: recorded, never credited to anyone here.
        other = await s.sim("/google/sim/purchases", {"productId": "coins_350", "obfuscatedAccountId": "not-ours"})
        other_token = other["purchaseToken"]
        assert await s.wait_processed(GOOGLE, _message(s, other_token, "oneTimeProductNotification")) == "recorded"

        # Google notifies the same refund again (a new message): nothing moves.
        voided = dict(s.push.deliveries[_message(s, token, "voidedPurchaseNotification")].notification)
        again = s.push.publish(voided)
        assert await s.wait_processed(GOOGLE, again) == "already_reversed"
        test = s.push.publish({"version": "1.0", "packageName": PACKAGE, "testNotification": {"version": "1.0"}})
        assert await s.wait_processed(GOOGLE, test) == "test"
        pending = await s.sim(
            "/google/sim/purchases", {"productId": "coins_350", "obfuscatedAccountId": obfuscated, "pending": True}
        )
        pending_token = pending["purchaseToken"]
        await s.sim(f"/google/sim/purchases/{pending_token}/cancel", {})
        assert await s.wait_processed(GOOGLE, _message(s, pending_token, "oneTimeProductNotification")) == "canceled"
        assert await s.balance("fan-g") == 0
        assert {d.state for d in s.push.deliveries.values()} == {"acked"}


def _message(system: System, token: str, kind: str) -> str:
    found = [m for m, d in system.push.deliveries.items() if d.notification.get(kind, {}).get("purchaseToken") == token]
    assert found, f"no {kind} for {token}"
    return found[-1]


async def test_notification_credits_only_what_the_app_store_rules_allow(
    database_url: str, keys: Keys, tmp_path: Path
) -> None:
    async with running_system(database_url, keys, tmp_path, with_worker=False) as s:
        s.notifier.config.auto = False
        token, _ = await s.bind("fan-n")
        bought = await s.sim("/apple/buy", {"productId": PACK, "appAccountToken": token})
        # The payload as the webhook hands it on once its signature is verified.
        payload = jwt.decode(bought["signedTransaction"], options={"verify_signature": False})
        handler = notification_handler(s.settings, s.components, OnLoop(asyncio.get_running_loop()))

        def charge(transaction: dict[str, Any], external_id: str) -> StoredNotification:
            stored = {"notification": {}, "transaction": transaction}
            txid, environment = str(transaction["transactionId"]), str(transaction["environment"])
            return StoredNotification(0, APPLE, external_id, "ONE_TIME_CHARGE", txid, environment, stored, "pending", 1)

        for field, value, reason in [
            ("type", "Non-Consumable", "NOT_CONSUMABLE"),
            ("inAppOwnershipType", "FAMILY_SHARED", "NOT_PURCHASED"),
            ("bundleId", "com.example.other", "WRONG_BUNDLE"),
            ("quantity", 0, "MALFORMED_TRANSACTION"),
        ]:
            with pytest.raises(Refused) as refused:
                await asyncio.to_thread(handler.handle, charge({**payload, field: value}, f"n-{field}"))
            assert refused.value.reason == reason
        assert await s.balance("fan-n") == 0
        assert await asyncio.to_thread(handler.handle, charge(payload, "n-ok")) == "credited"
        assert await s.balance("fan-n") == 350
