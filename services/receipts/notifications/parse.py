"""Turn a webhook body into a verified, storable notification, or say why not.

Nothing here touches the database: the webhook stores what these functions
return, and only after everything that can be checked has been checked.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.errors import DomainError, Unavailable
from services.common.limits import json_depth
from services.common.loop import OnLoop
from services.receipts.apple.jws import AppleJwsVerifier
from services.receipts.notifications.repository import NewNotification
from services.receipts.purchases.model import evidence_hash

# Apple's and Google's bodies nest four or five levels; anything far deeper is an attack
# on the parser (json.loads recurses), refused before parsing.
MAX_JSON_DEPTH = 32

APPLE = "apple"
_NEEDS_TRANSACTION = ("ONE_TIME_CHARGE", "REFUND", "REFUND_REVERSED", "REFUND_DECLINED", "CONSUMPTION_REQUEST")
GOOGLE = "google"


class Rejected(Exception):
    """The sender did something wrong; ``status`` is the HTTP answer (400/401/403)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class AppleExpectations:
    bundle_id: str
    app_apple_id: int


def _json_object(raw: bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    if json_depth(raw) > max_depth:
        raise Rejected(400, f"{what} nests deeper than {max_depth} levels")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Rejected(400, f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise Rejected(400, f"{what} is not a JSON object")
    return value


def _text(value: Any, field: str, *, required: bool = True, limit: int = 512) -> str | None:
    if value is None or value == "":
        if required:
            raise Rejected(400, f"{field} is missing")
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise Rejected(400, f"{field} is not a string of at most {limit} characters")
    return value


def _verified(jws: str, what: str, verifier: AppleJwsVerifier, loop: OnLoop) -> dict[str, Any]:
    """The payload of an Apple JWS; forged or not chained to our roots → 401. An
    unreachable OCSP responder is not the sender's fault: that error propagates."""
    try:
        return verifier.verify_blocking(jws, "signedPayload", loop)
    except Unavailable:
        raise
    except DomainError as exc:
        raise Rejected(401, f"{what}: {exc.reason}: {exc.message}") from None


def parse_apple(
    body: bytes,
    verifier: AppleJwsVerifier,
    expect: AppleExpectations,
    loop: OnLoop,
    max_depth: int = MAX_JSON_DEPTH,
) -> NewNotification:
    """ResponseBodyV2 → verified notification (payload plus the verified transaction).
    Runs in a worker thread; ``loop`` is the one owning the verifier's OCSP client."""
    envelope = _json_object(body, "body", max_depth)
    signed = _text(envelope.get("signedPayload"), "signedPayload", limit=512 * 1024)
    assert signed is not None
    if signed.count(".") != 2:
        raise Rejected(400, "signedPayload is not a JWS")
    payload = _verified(signed, "signedPayload", verifier, loop)
    notification_type = _text(payload.get("notificationType"), "notificationType", limit=64)
    uuid = _text(payload.get("notificationUUID"), "notificationUUID", limit=128)
    assert notification_type is not None
    assert uuid is not None
    data = payload.get("data")
    environment: str | None = None
    transaction: dict[str, Any] | None = None
    if isinstance(data, dict):
        environment = _text(data.get("environment"), "data.environment", limit=16)
        if data.get("bundleId") != expect.bundle_id:
            raise Rejected(403, "data.bundleId is not this app's")
        if environment not in ("Production", "Sandbox"):
            raise Rejected(403, f"data.environment {environment!r} is not accepted")
        if environment == "Production" and data.get("appAppleId") != expect.app_apple_id:
            raise Rejected(403, "data.appAppleId is not this app's")
        signed_transaction = data.get("signedTransactionInfo")
        if signed_transaction is not None:
            _text(signed_transaction, "data.signedTransactionInfo", limit=256 * 1024)
            transaction = _verified(signed_transaction, "data.signedTransactionInfo", verifier, loop)
            if transaction.get("bundleId") != expect.bundle_id:
                raise Rejected(403, "signedTransactionInfo.bundleId is not this app's")
            if transaction.get("environment") != environment:
                raise Rejected(403, "signedTransactionInfo.environment differs from the notification's")
    elif notification_type != "TEST":
        raise Rejected(400, "data is missing")
    if notification_type in _NEEDS_TRANSACTION and transaction is None:
        raise Rejected(400, "data.signedTransactionInfo is missing")
    stored: dict[str, Any] = {
        "notification": _without_signed(payload),
        "transaction": transaction,
        "evidence_sha256": evidence_hash(signed_transaction) if isinstance(signed_transaction, str) else "",
    }
    return NewNotification(
        source=APPLE,
        external_id=uuid,
        notification_type=notification_type,
        store_transaction_id=None if transaction is None else _opt_str(transaction.get("transactionId")),
        environment=environment,
        body=body.decode("utf-8"),
        payload=stored,
    )


def _without_signed(payload: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(payload)
    data = result.get("data")
    if isinstance(data, dict):
        result["data"] = {k: v for k, v in data.items() if not k.startswith("signed")}
    return result


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def decode_pubsub_data(data: str) -> bytes:
    """Base64 of either alphabet, padding optional (the RTDN doc says standard; be tolerant)."""
    cleaned = "".join(data.split()).replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(400, "message.data is not base64") from None


GOOGLE_KINDS = (
    "oneTimeProductNotification",
    "voidedPurchaseNotification",
    "testNotification",
    "subscriptionNotification",
    "pendingRefundReviewNotification",
)


def parse_google(body: bytes, package_name: str, max_depth: int = MAX_JSON_DEPTH) -> NewNotification:
    """Pub/Sub push envelope (already authenticated) → notification."""
    envelope = _json_object(body, "body", max_depth)
    message = envelope.get("message")
    if not isinstance(message, dict):
        raise Rejected(400, "message is missing")
    message_id = _text(message.get("messageId") or message.get("message_id"), "message.messageId", limit=128)
    assert message_id is not None
    data = _text(message.get("data"), "message.data", limit=1024 * 1024)
    assert data is not None
    notification = _json_object(decode_pubsub_data(data), "message.data", max_depth)
    if notification.get("packageName") != package_name:
        raise Rejected(403, "packageName is not this app's")
    kind = next((k for k in GOOGLE_KINDS if isinstance(notification.get(k), dict)), None)
    token: str | None = None
    if kind == "oneTimeProductNotification":
        sub = notification[kind]
        token = _text(sub.get("purchaseToken"), f"{kind}.purchaseToken")
        code = sub.get("notificationType")
        if not isinstance(code, int):
            raise Rejected(400, f"{kind}.notificationType is not an integer")
        _text(sub.get("sku"), f"{kind}.sku", limit=256)
    elif kind == "voidedPurchaseNotification":
        sub = notification[kind]
        token = _text(sub.get("purchaseToken"), f"{kind}.purchaseToken")
    elif kind is not None:
        token = _text(notification[kind].get("purchaseToken"), f"{kind}.purchaseToken", required=False)
    return NewNotification(
        source=GOOGLE,
        external_id=message_id,
        notification_type=kind or "unknown",
        store_transaction_id=token,
        environment=None,
        body=body.decode("utf-8"),
        payload={"notification": notification, "subscription": envelope.get("subscription")},
    )
