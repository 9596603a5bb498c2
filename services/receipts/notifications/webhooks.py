"""The receipts service's webhook server: App Store Server Notifications V2 and
Cloud Pub/Sub push (Play RTDN), on COINSTORE_WEBHOOK_PORT.

Every notification is verified, then stored in the durable inbox, then
acknowledged: a 2xx means the row is committed. Processing happens in the
receipts Celery worker (the task is sent best-effort; the sweeper re-queues
anything whose task was lost). Answers: 200 stored (or already stored),
400 malformed (or nested too deep), 401/403 forged or not for us (nothing
stored), 403 an Apple notification older than the accepted age, 408 a body not
sent within the read timeout, 413 too large, 503 when a dependency is down or
too many requests are in flight (with Retry-After; the store retries). Never 500
for the sender.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from services.common.clock import Clock
from services.common.failpoints import Failpoints
from services.common.loop import OnLoop
from services.common.metrics import Metrics
from services.receipts.apple.jws import AppleJwsVerifier
from services.receipts.notifications.parse import (
    APPLE,
    GOOGLE,
    MAX_JSON_DEPTH,
    AppleExpectations,
    Rejected,
    parse_apple,
    parse_google,
)
from services.receipts.notifications.pubsub_auth import KeysUnavailable, PubSubTokenVerifier, TokenRejected
from services.receipts.notifications.repository import InboxRepository, NewNotification

log = logging.getLogger(__name__)

APPLE_PATH = "/notifications/apple/v2"
GOOGLE_PATH = "/notifications/google"
_SOURCES = {APPLE_PATH: APPLE, GOOGLE_PATH: GOOGLE}


@dataclass(frozen=True)
class WebhookLimits:
    """What one sender may ask of the webhook listener (COINSTORE_WEBHOOK_* settings)."""

    max_body_bytes: int = 1024 * 1024
    max_json_depth: int = MAX_JSON_DEPTH
    read_timeout_seconds: float = 10.0
    max_concurrent_requests: int = 64
    # Apple retries a notification for about 6.5 days: a genuine one is never older than this.
    apple_max_age: timedelta = timedelta(hours=168)


@dataclass
class WebhookDeps:
    inbox: InboxRepository
    apple_verifier: AppleJwsVerifier
    apple: AppleExpectations
    pubsub: PubSubTokenVerifier
    package_name: str
    # Sends the processing task for a stored row; failures are only logged (the sweeper retries).
    dispatch: Callable[[int], None]
    metrics: Metrics
    clock: Clock
    failpoints: Failpoints = field(default_factory=Failpoints)
    limits: WebhookLimits = field(default_factory=WebhookLimits)


class WebhookMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.received = metrics.counter(
            "coinstore_notifications_received",
            "Webhook notifications by source and HTTP status answered",
            ("source", "status"),
        )
        self.latency = metrics.histogram(
            "coinstore_webhook_duration_seconds", "Webhook handling time by source", ("source",)
        )
        self.too_old = metrics.counter(
            "coinstore_notifications_too_old",
            "Notifications refused at the webhook as older than COINSTORE_APPLE_NOTIFICATION_MAX_AGE_HOURS",
            ("source",),
        )


def _apple_too_old(item: NewNotification, now: datetime, max_age: timedelta) -> bool:
    signed = item.payload.get("notification", {}).get("signedDate")
    if type(signed) is not int:
        raise Rejected(400, "signedDate is missing")
    return now - datetime.fromtimestamp(signed / 1000, UTC) > max_age


def create_webhook_app(deps: WebhookDeps) -> web.Application:
    limits = deps.limits
    instruments = WebhookMetrics(deps.metrics)
    in_flight = 0

    @web.middleware
    async def capped(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        nonlocal in_flight
        source = _SOURCES.get(request.path)
        if source is None:
            return await handler(request)
        if in_flight >= limits.max_concurrent_requests:
            log.warning("webhook busy", extra={"source": source, "client": request.remote, "in_flight": in_flight})
            instruments.received.labels(source, "503").inc()
            busy = web.json_response({"error": "busy, retry later"}, status=503, headers={"Retry-After": "1"})
            busy.force_close()
            return busy
        in_flight += 1
        try:
            return await handler(request)
        finally:
            in_flight -= 1

    # The stores send plain JSON; decoding a Content-Encoding in the HTTP parser would
    # let a sender make a 1 MiB limit of compressed bytes, and a bad stream can stall it.
    app = web.Application(
        client_max_size=limits.max_body_bytes, middlewares=[capped], handler_args={"auto_decompress": False}
    )

    async def read_body(request: web.Request) -> bytes:
        too_large = Rejected(413, f"body over {limits.max_body_bytes} bytes")
        if request.content_length is not None and request.content_length > limits.max_body_bytes:
            raise too_large
        try:
            async with asyncio.timeout(limits.read_timeout_seconds):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        except TimeoutError:
            raise Rejected(408, f"body not received within {limits.read_timeout_seconds:g} s") from None
        except web.RequestPayloadError:  # e.g. a body shorter than its Content-Length
            raise Rejected(400, "body cannot be read") from None
        except ConnectionError:  # the sender hung up mid-body: nobody to answer, nothing to store
            raise Rejected(400, "connection lost before the body was complete") from None

    async def accept(item: NewNotification, client: str | None) -> web.Response:
        # On the database's own pool (sized to its connections), not the loop's small default executor.
        accepted = await deps.inbox.db.run(deps.inbox.accept, item, deps.clock.now())
        # Committed, not yet queued nor acknowledged: the store will send it again.
        deps.failpoints.hit("receipts.webhook.after_commit")
        if not accepted.duplicate:
            try:
                await asyncio.to_thread(deps.dispatch, accepted.id)
            except Exception:  # the row is committed; the sweeper will queue it
                log.warning("could not queue notification %d; the sweeper will", accepted.id, exc_info=True)
        log.info(
            "notification stored",
            extra={
                "source": item.source,
                "external_id": item.external_id,
                "type": item.notification_type,
                "duplicate": accepted.duplicate,
                "client": client,
            },
        )
        return web.json_response({"status": "duplicate" if accepted.duplicate else "stored"})

    def fresh(item: NewNotification) -> NewNotification:
        """The HTTP door only: replayed inbox rows and reconciliation never pass here."""
        if item.source == APPLE and _apple_too_old(item, deps.clock.now(), limits.apple_max_age):
            instruments.too_old.labels(APPLE).inc()
            raise Rejected(403, f"notification signed more than {limits.apple_max_age} ago")
        return item

    async def handle(source: str, request: web.Request, parse: Callable[[bytes], NewNotification]) -> web.Response:
        started = asyncio.get_running_loop().time()
        client = request.remote
        try:
            body = await read_body(request)
            item = fresh(await asyncio.to_thread(parse, body))
            response = await accept(item, client)
        except Rejected as exc:
            log.warning(
                "notification refused",
                extra={"source": source, "status": exc.status, "why": exc.reason, "client": client},
            )
            response = web.json_response({"error": exc.reason}, status=exc.status)
            if exc.status in (400, 408, 413):
                response.force_close()  # the rest of the body is not worth reading
        except KeysUnavailable as exc:
            log.warning("cannot verify now: %s", exc, extra={"client": client})
            response = web.json_response({"error": "verification keys unavailable"}, status=503)
        except SQLAlchemyError:
            log.exception("inbox unavailable", extra={"client": client})
            response = web.json_response({"error": "temporarily unavailable"}, status=503)
        instruments.received.labels(source, str(response.status)).inc()
        instruments.latency.labels(source).observe(asyncio.get_running_loop().time() - started)
        return response

    async def apple(request: web.Request) -> web.Response:
        loop = OnLoop(asyncio.get_running_loop())
        return await handle(
            APPLE,
            request,
            lambda body: parse_apple(body, deps.apple_verifier, deps.apple, loop, limits.max_json_depth),
        )

    async def google(request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization")

        def parse(body: bytes) -> NewNotification:
            try:
                deps.pubsub.verify(authorization)
            except TokenRejected as exc:
                raise Rejected(401 if not authorization else 403, f"token refused: {exc}") from None
            return parse_google(body, deps.package_name, limits.max_json_depth)

        return await handle(GOOGLE, request, parse)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_post(APPLE_PATH, apple)
    app.router.add_post(GOOGLE_PATH, google)
    app.router.add_get("/healthz", healthz)
    return app


class WebhookServer:
    """Runs the webhook app inside the receipts process's event loop."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._runner = web.AppRunner(app, access_log=None)
        self._host = host
        self._port = port
        self.port = 0

    async def start(self) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self._port
        log.info("webhooks listening on port %d", self.port)
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()


class InboxCollector(Collector):
    """`coinstore_notifications_inbox{state}`: rows per state, read at scrape time,
    so failed and dead notifications are visible on the receipts metrics port."""

    def __init__(self, inbox: InboxRepository) -> None:
        self._inbox = inbox

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "coinstore_notifications_inbox", "Stored store notifications by processing state", labels=["state"]
        )
        try:
            counts = self._inbox.counts()
        except SQLAlchemyError:
            counts = {}
        for state in ("pending", "failed", "processed", "dead"):
            family.add_metric([state], counts.get(state, 0))
        yield family
