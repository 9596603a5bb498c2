"""App Store Server Notifications V2 sender of the store simulator.

Sends ``{"signedPayload": <JWS>}`` (signed with the App Store simulator's
chain) to a configurable webhook URL when the simulator's control endpoints
buy (ONE_TIME_CHARGE), refund (REFUND) or reverse a refund (REFUND_REVERSED),
and on request (CONSUMPTION_REQUEST, REFUND_DECLINED, TEST). Apple's delivery
rules, simplified: HTTP 200–206 is success; anything else is retried after
each of ``retry_delays_seconds`` (Apple: 1, 12, 24, 48, 72 hours), in
Production only — Sandbox attempts once. Every attempt is logged in the App
Store state, so Get Notification History sees it.

Control endpoints:
- ``POST /apple/notifications/config`` {"webhook_url", "auto", "lose_next",
  "retry_delays_seconds", "timeout_seconds", "app_apple_id_in_sandbox"}
- ``POST /apple/notifications/send`` {"notificationType", "transactionId",
  "consumptionRequestReason"?}
- ``GET /apple/notifications/deliveries``
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from services.storesim.apple import APPLE_STORE, AppleStore
from services.storesim.config import StoresimSettings

log = logging.getLogger(__name__)

SUCCESS_STATUSES = range(200, 207)
# Control routes of the App Store simulator and the notification each one causes.
_AUTO = {
    "/apple/buy": "ONE_TIME_CHARGE",
    "/apple/refund": "REFUND",
    "/apple/refund/reverse": "REFUND_REVERSED",
}


@dataclass
class NotifierConfig:
    webhook_url: str = "http://127.0.0.1:8080/notifications/apple/v2"
    # Send ONE_TIME_CHARGE / REFUND / REFUND_REVERSED on the control endpoints.
    auto: bool = True
    # Drop the next N notifications without sending them (a lost notification).
    lose_next: int = 0
    retry_delays_seconds: tuple[float, ...] = (1.0, 12.0, 24.0, 48.0, 72.0)
    timeout_seconds: float = 10.0


@dataclass
class Delivery:
    notification_uuid: str
    notification_type: str
    transaction_id: str
    environment: str
    signed_payload: str
    attempts: list[int] = field(default_factory=list)
    state: str = "pending"  # pending, delivered, failed, lost


class AppleNotifier:
    def __init__(self, store: AppleStore, config: NotifierConfig | None = None) -> None:
        self.store = store
        self.config = config or NotifierConfig()
        self.deliveries: dict[str, Delivery] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def signed_payload(
        self, notification_type: str, transaction_id: str, *, consumption_request_reason: str | None = None
    ) -> tuple[str, str, str]:
        """(notificationUUID, environment, signedPayload) for a notification about a transaction."""
        transaction = self.store.transaction(transaction_id)
        if transaction is None:
            raise KeyError(transaction_id)
        environment = str(transaction["environment"])
        data: dict[str, Any] = {
            "bundleId": self.store.bundle_id,
            "bundleVersion": "1.0",
            "environment": environment,
            "signedTransactionInfo": self.store.signed_transaction(transaction_id),
        }
        if environment == "Production":
            data["appAppleId"] = self.store.app_apple_id
        if consumption_request_reason:
            data["consumptionRequestReason"] = consumption_request_reason
        notification_uuid = str(uuid.uuid4())
        payload = {
            "notificationType": notification_type,
            "notificationUUID": notification_uuid,
            "data": data,
            "version": "2.0",
            "signedDate": self.store.clock(),
        }
        return notification_uuid, environment, self.store.sign(payload)

    def send(self, notification_type: str, transaction_id: str, **options: Any) -> Delivery:
        """Queue a notification for delivery (needs a running event loop)."""
        notification_uuid, environment, signed = self.signed_payload(notification_type, transaction_id, **options)
        delivery = Delivery(notification_uuid, notification_type, transaction_id, environment, signed)
        self.deliveries[notification_uuid] = delivery
        if self.config.lose_next > 0:
            self.config.lose_next -= 1
            delivery.state = "lost"
            self.store.log_notification(signed, notification_type, transaction_id, environment, "NO_RESPONSE")
            log.info("apple notifications: lost %s on purpose", notification_uuid)
            return delivery
        task = asyncio.get_running_loop().create_task(self._deliver(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return delivery

    async def _deliver(self, delivery: Delivery) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        delays = list(self.config.retry_delays_seconds) if delivery.environment == "Production" else []
        while True:
            try:
                async with self._session.post(
                    self.config.webhook_url,
                    json={"signedPayload": delivery.signed_payload},
                    timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
                ) as response:
                    status = response.status
                result = "SUCCESS" if status in SUCCESS_STATUSES else "UNSUCCESSFUL_HTTP_RESPONSE_CODE"
            except TimeoutError:
                status, result = 0, "TIMED_OUT"
            except aiohttp.ClientError:
                status, result = 0, "NO_RESPONSE"
            delivery.attempts.append(status)
            self.store.log_notification(
                delivery.signed_payload,
                delivery.notification_type,
                delivery.transaction_id,
                delivery.environment,
                result,
            )
            if result == "SUCCESS":
                delivery.state = "delivered"
                return
            if not delays:
                delivery.state = "failed"
                return
            await asyncio.sleep(delays.pop(0))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()


APPLE_NOTIFIER = web.AppKey("apple_notifier", AppleNotifier)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def setup(app: web.Application, settings: StoresimSettings) -> None:
    """Add this stand-in's routes to the simulator (after the App Store stand-in)."""
    add_routes(app, AppleNotifier(app[APPLE_STORE]))


def add_routes(app: web.Application, notifier: AppleNotifier) -> None:
    app[APPLE_NOTIFIER] = notifier

    @web.middleware
    async def notify_on_control(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        kind = _AUTO.get(request.path) if request.method == "POST" else None
        if kind and notifier.config.auto and response.status == 200 and isinstance(response, web.Response):
            body = json.loads(response.body or b"{}") if request.path == "/apple/buy" else await request.json()  # type: ignore[arg-type]
            notifier.send(kind, str(body["transactionId"]))
        return response

    async def configure(request: web.Request) -> web.Response:
        changes = await request.json()
        for name, value in changes.items():
            if not hasattr(notifier.config, name):
                return web.json_response({"error": f"unknown setting {name}"}, status=400)
            current = getattr(notifier.config, name)
            setattr(notifier.config, name, tuple(value) if isinstance(current, tuple) else type(current)(value))
        return web.json_response(vars(notifier.config))

    async def send(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            delivery = notifier.send(
                str(body.get("notificationType", "")),
                str(body.get("transactionId", "")),
                consumption_request_reason=body.get("consumptionRequestReason"),
            )
        except KeyError:
            return web.json_response({"error": "unknown transaction id"}, status=404)
        return web.json_response({"notificationUUID": delivery.notification_uuid})

    async def deliveries(_request: web.Request) -> web.Response:
        return web.json_response(
            [
                {"notificationUUID": d.notification_uuid, "type": d.notification_type, "state": d.state}
                | {"attempts": d.attempts}
                for d in notifier.deliveries.values()
            ]
        )

    async def on_cleanup(_app: web.Application) -> None:
        await notifier.close()

    app.middlewares.append(notify_on_control)
    app.router.add_post("/apple/notifications/config", configure)
    app.router.add_post("/apple/notifications/send", send)
    app.router.add_get("/apple/notifications/deliveries", deliveries)
    app.on_cleanup.append(on_cleanup)
