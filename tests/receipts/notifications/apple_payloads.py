"""App Store payloads for tests: transactions and V2 notifications, signed by
the App Store simulator's chain (``AppleStore.sign``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

Sign = Callable[[dict[str, Any]], str]


def transaction(
    transaction_id: str,
    *,
    product_id: str = "coins_100",
    app_account_token: str | None = None,
    bundle_id: str = "com.coinstore.app",
    environment: str = "Production",
    quantity: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp() * 1000)
    payload: dict[str, Any] = {
        "transactionId": transaction_id,
        "originalTransactionId": transaction_id,
        "bundleId": bundle_id,
        "productId": product_id,
        "type": "Consumable",
        "quantity": quantity,
        "purchaseDate": now,
        "originalPurchaseDate": now,
        "signedDate": now,
        "inAppOwnershipType": "PURCHASED",
        "environment": environment,
        "storefront": "USA",
        "storefrontId": "143441",
        "price": 990,
        "currency": "USD",
        "transactionReason": "PURCHASE",
    }
    if app_account_token:
        payload["appAccountToken"] = app_account_token
    payload.update(extra)
    return payload


def notification(
    sign: Sign,
    notification_type: str,
    signed_transaction: str | None,
    *,
    bundle_id: str = "com.coinstore.app",
    environment: str = "Production",
    app_apple_id: int | None = 1234567890,
    notification_uuid: str | None = None,
    signed_date: datetime | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"environment": environment, "bundleId": bundle_id, "bundleVersion": "1"}
    if app_apple_id is not None:
        data["appAppleId"] = app_apple_id
    if signed_transaction is not None:
        data["signedTransactionInfo"] = signed_transaction
    payload = {
        "notificationType": notification_type,
        "notificationUUID": notification_uuid or str(uuid.uuid4()),
        "version": "2.0",
        "signedDate": int((signed_date or datetime.now(UTC)).timestamp() * 1000),
        "data": data,
    }
    return {"signedPayload": sign(payload)}
