"""Cloud Pub/Sub push (Play real-time developer notifications) of the store simulator.

Imitates a push subscription with authentication enabled: each RTDN is wrapped
in the push envelope and POSTed to the configured endpoint with an
``Authorization: Bearer`` OIDC token (RS256, signed by the simulator's own key,
whose JWKS is served at ``/pubsub/jwks``). Anything but 102/200/201/202/204 is
redelivered with exponential backoff, as Pub/Sub does.

Google Play purchase changes (PURCHASED, CANCELED, VOIDED) of the Play
stand-in are published as RTDN automatically; other parts of the simulator
publish through ``app[PUBSUB].publish(...)``;
tests drive it over HTTP under ``/pubsub/control/…``:

- ``POST /pubsub/control/config`` {"push_endpoint", "audience", "service_account",
  "lose_next", "retry_initial_seconds", "max_attempts"}; an empty ``push_endpoint``
  is a topic without a push subscription: messages are published, none is pushed
  (state ``unsubscribed``)
- ``POST /pubsub/control/publish`` {"notification": {...DeveloperNotification...}}
- ``GET /pubsub/control/deliveries``
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from services.storesim.config import StoresimSettings
from services.storesim.google import PLAY_STATE, PlayEvent

log = logging.getLogger(__name__)

ACK_STATUSES = frozenset({102, 200, 201, 202, 204})
ISSUER = "https://accounts.google.com"
SUBSCRIPTION = "projects/coinstore-dev/subscriptions/play-rtdn"


@dataclass
class PushConfig:
    push_endpoint: str = "http://127.0.0.1:8080/notifications/google"  # "": no push subscription
    audience: str = "http://127.0.0.1:8080/notifications/google"
    service_account: str = "pubsub-push@coinstore-dev.iam.gserviceaccount.com"
    # Drop the next N messages without delivering them (a "lost" notification).
    lose_next: int = 0
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    max_attempts: int = 12
    timeout_seconds: float = 10.0


@dataclass
class Delivery:
    message_id: str
    notification: dict[str, Any]
    attempts: list[int] = field(default_factory=list)
    state: str = "pending"  # pending, acked, lost, abandoned, unsubscribed


def _load_or_create_key(directory: Path) -> rsa.RSAPrivateKey:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pubsub-signing-key.pem"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return key


class PubSubPush:
    def __init__(self, key: rsa.RSAPrivateKey, config: PushConfig | None = None) -> None:
        self.key = key
        self.kid = _kid(key)
        self.config = config or PushConfig()
        self.deliveries: dict[str, Delivery] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def jwks(self) -> dict[str, Any]:
        public = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**public, "kid": self.kid, "alg": "RS256", "use": "sig"}]}

    def token(self, **overrides: Any) -> str:
        """An OIDC token as Pub/Sub mints it; ``overrides`` replace claims (None removes one)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": self.config.audience,
            "azp": "113774264463038321964",
            "email": self.config.service_account,
            "email_verified": True,
            "exp": now + 3600,
            "iat": now,
            "iss": ISSUER,
            "sub": "113774264463038321964",
        }
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    @staticmethod
    def envelope(notification: dict[str, Any], message_id: str, *, urlsafe: bool = False) -> dict[str, Any]:
        raw = json.dumps(notification).encode()
        data = base64.urlsafe_b64encode(raw).decode().rstrip("=") if urlsafe else base64.b64encode(raw).decode()
        published = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "message": {
                "attributes": {},
                "data": data,
                "messageId": message_id,
                "message_id": message_id,
                "publishTime": published,
                "publish_time": published,
            },
            "subscription": SUBSCRIPTION,
        }

    def publish(self, notification: dict[str, Any]) -> str:
        """Queue one RTDN for push delivery; returns its messageId. Needs a running loop."""
        message_id = str(uuid.uuid4().int)[:16]
        delivery = Delivery(message_id, notification)
        self.deliveries[message_id] = delivery
        if not self.config.push_endpoint:
            delivery.state = "unsubscribed"
            return message_id
        if self.config.lose_next > 0:
            self.config.lose_next -= 1
            delivery.state = "lost"
            log.info("pubsub: lost message %s on purpose", message_id)
            return message_id
        task = asyncio.get_running_loop().create_task(self._deliver(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return message_id

    async def _deliver(self, delivery: Delivery) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        delay = self.config.retry_initial_seconds
        body = self.envelope(delivery.notification, delivery.message_id)
        while len(delivery.attempts) < self.config.max_attempts:
            try:
                async with self._session.post(
                    self.config.push_endpoint,
                    json=body,
                    headers={"Authorization": f"Bearer {self.token()}"},
                    timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
                ) as response:
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            delivery.attempts.append(status)
            if status in ACK_STATUSES:
                delivery.state = "acked"
                return
            await asyncio.sleep(delay)
            delay = min(self.config.retry_max_seconds, delay * 2)
        delivery.state = "abandoned"

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()


def _kid(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:40]


PUBSUB = web.AppKey("pubsub", PubSubPush)


ONE_TIME_PRODUCT_PURCHASED = 1
ONE_TIME_PRODUCT_CANCELED = 2
PRODUCT_TYPE_ONE_TIME = 2
REFUND_TYPE_FULL_REFUND = 1
REFUND_TYPE_QUANTITY_BASED_PARTIAL_REFUND = 2


def rtdn(event: PlayEvent) -> dict[str, Any]:
    """The DeveloperNotification Google Play publishes for a purchase state change."""
    purchase = event.purchase
    notification: dict[str, Any] = {
        "version": "1.0",
        "packageName": purchase.package_name,
        "eventTimeMillis": str(int(time.time() * 1000)),
    }
    if event.kind == "VOIDED" and event.voided is not None:
        partial = event.voided.voided_quantity is not None and purchase.refundable_quantity > 0
        notification["voidedPurchaseNotification"] = {
            "purchaseToken": purchase.token,
            "orderId": event.voided.order_id or "",
            "productType": PRODUCT_TYPE_ONE_TIME,
            "refundType": REFUND_TYPE_QUANTITY_BASED_PARTIAL_REFUND if partial else REFUND_TYPE_FULL_REFUND,
        }
    else:
        code = ONE_TIME_PRODUCT_PURCHASED if event.kind == "PURCHASED" else ONE_TIME_PRODUCT_CANCELED
        notification["oneTimeProductNotification"] = {
            "version": "1.0",
            "notificationType": code,
            "purchaseToken": purchase.token,
            "sku": purchase.product_id,
        }
    return notification


def setup(app: web.Application, settings: StoresimSettings) -> None:
    """Add this stand-in's routes to the simulator; Play purchase changes are pushed as RTDN."""
    push = PubSubPush(_load_or_create_key(settings.state_dir / "pubsub"))
    app[PUBSUB] = push
    loops: list[asyncio.AbstractEventLoop] = []

    def on_play_event(event: PlayEvent) -> None:
        if loops:
            loops[0].call_soon_threadsafe(push.publish, rtdn(event))

    async def on_startup(_app: web.Application) -> None:
        loops.append(asyncio.get_running_loop())

    if PLAY_STATE in app:
        app[PLAY_STATE].subscribe(on_play_event)
    app.on_startup.append(on_startup)

    async def jwks(_request: web.Request) -> web.Response:
        return web.json_response(push.jwks(), headers={"Cache-Control": "public, max-age=3600"})

    async def configure(request: web.Request) -> web.Response:
        changes = await request.json()
        for name, value in changes.items():
            if not hasattr(push.config, name):
                return web.json_response({"error": f"unknown setting {name}"}, status=400)
            setattr(push.config, name, type(getattr(push.config, name))(value))
        return web.json_response(vars(push.config))

    async def publish(request: web.Request) -> web.Response:
        body = await request.json()
        notification = body.get("notification")
        if not isinstance(notification, dict):
            return web.json_response({"error": "notification is required"}, status=400)
        return web.json_response({"messageId": push.publish(notification)})

    async def deliveries(_request: web.Request) -> web.Response:
        return web.json_response(
            [{"messageId": d.message_id, "state": d.state, "attempts": d.attempts} for d in push.deliveries.values()]
        )

    async def on_cleanup(_app: web.Application) -> None:
        await push.close()

    app.router.add_get("/pubsub/jwks", jwks)
    app.router.add_post("/pubsub/control/config", configure)
    app.router.add_post("/pubsub/control/publish", publish)
    app.router.add_get("/pubsub/control/deliveries", deliveries)
    app.on_cleanup.append(on_cleanup)
