"""The notification path as it runs for real, in one test process on free ports:
the store simulator (App Store, its V2 notification sender, Google Play, Pub/Sub push),
the real wallet gRPC service, the receipts webhook server over the core's
components, and a real Celery worker on the embedded broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from celery import Celery
from celery.contrib.testing.worker import start_worker

from coinstore.receipts.v1 import receipt_service_pb2 as rpb
from coinstore.type.v1 import money_pb2
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common.celery_app import make_celery_app
from services.receipts.config import ReceiptsSettings
from services.receipts.notifications import tasks as notification_tasks
from services.receipts.notifications.repository import InboxRepository
from services.receipts.notifications.webhooks import WebhookServer, create_webhook_app
from services.receipts.purchases.repository import BindingRepository
from services.receipts.wiring import (
    Components,
    build_components,
    build_notification_worker,
    build_servicer,
    webhook_deps,
)
from services.storesim.app import create_app
from services.storesim.apple import APPLE_STORE, AppleStore
from services.storesim.apple_notifications import APPLE_NOTIFIER, AppleNotifier
from services.storesim.config import StoresimSettings
from services.storesim.google import PLAY_STATE, PlayState
from services.storesim.pubsub import PUBSUB, PubSubPush
from tests.receipts.support import receipts_settings, runtime_for, simulator_settings
from tests.support.tokens import Keys
from tests.wallet.support import Wallet, running_wallet

PUSH_AUDIENCE = "https://receipts.test/notifications/google"
PUSH_ACCOUNT = "pubsub-push@coinstore-test.iam.gserviceaccount.com"


@dataclass
class System:
    sim_url: str
    play: PlayState
    apple: AppleStore
    notifier: AppleNotifier
    push: PubSubPush
    wallet: Wallet
    settings: ReceiptsSettings
    components: Components
    inbox: InboxRepository
    bindings: BindingRepository
    webhook_url: str
    celery: Celery
    queue: str

    async def sim(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.post(self.sim_url + path, json=body) as reply:
            assert reply.status in (200, 201), await reply.text()
            result: dict[str, Any] = await reply.json()
            return result

    async def bind(self, account_id: str) -> tuple[str, str]:
        """GetPurchaseBinding, as the app backend calls it before a purchase (it records the binding)."""
        servicer = build_servicer(self.components)
        reply = await servicer.GetPurchaseBinding(rpb.GetPurchaseBindingRequest(account_id=account_id), None)
        return reply.app_account_token, reply.obfuscated_account_id

    async def balance(self, account_id: str) -> int:
        return (await self.wallet.balance(account_id)).coins

    async def wait_processed(self, source: str, external_id: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stored = self.inbox.get(source, external_id)
            if stored is not None:
                state, outcome, _ = self.inbox.outcome(stored.id)
                if state == "processed":
                    return str(outcome)
            await asyncio.sleep(0.05)
        raise AssertionError(f"{source} notification {external_id} not processed in {timeout}s")

    async def wait_balance(self, account_id: str, coins: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (current := await self.balance(account_id)) != coins:
            if time.monotonic() > deadline:
                raise AssertionError(f"balance of {account_id} is {current}, expected {coins}")
            await asyncio.sleep(0.05)

    def sweep(self) -> None:
        self.celery.send_task(notification_tasks.task_names(self.queue)[1], queue=self.queue)


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextmanager
def worker(app: Celery, queue: str) -> Iterator[None]:
    with start_worker(app, pool="solo", perform_ping_check=False, queues=[queue], loglevel="WARNING"):
        yield


@asynccontextmanager
async def running_system(
    database_url: str,
    keys: Keys,
    tmp_path: Path,
    *,
    with_worker: bool = True,
    settings_extra: dict[str, str] | None = None,
    dispatch_wrapper: Callable[[Callable[[int], None]], Callable[[int], None]] | None = None,
) -> AsyncIterator[System]:
    state_dir = tmp_path / "storesim"
    sim_app = create_app(StoresimSettings(state_dir=state_dir))
    push = sim_app[PUBSUB]
    push.config.audience = PUSH_AUDIENCE
    push.config.service_account = PUSH_ACCOUNT
    push.config.retry_initial_seconds = 0.05
    notifier = sim_app[APPLE_NOTIFIER]
    notifier.config.retry_delays_seconds = (0.05, 0.1, 0.2)
    async with serve(sim_app) as sim_url, running_wallet(database_url, keys, tmp_path) as wallet:
        play = sim_app[PLAY_STATE]
        play.write_service_account(sim_url)
        extra = {
            **simulator_settings(sim_url),
            "GOOGLE_SERVICE_ACCOUNT_FILE": str(play.service_account_path),
            "GOOGLE_API_ENDPOINT": sim_url + "/",
            "GOOGLE_API_TIMEOUT_SECONDS": "5",
            "PUBSUB_JWKS_URL": f"{sim_url}/pubsub/jwks",
            "PUBSUB_AUDIENCE": PUSH_AUDIENCE,
            "PUBSUB_SERVICE_ACCOUNT": PUSH_ACCOUNT,
            "BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            "NOTIFICATIONS_SWEEP_SECONDS": "1",
            **(settings_extra or {}),
        }
        settings = receipts_settings(keys, database_url, wallet.port, state_dir, **extra)
        runtime = runtime_for(settings)
        components = build_components(settings, runtime)
        queue = f"receipts-{uuid.uuid4().hex[:8]}"
        celery = make_celery_app(queue, settings.broker_url)
        notification_tasks.register(celery, settings, lambda: build_notification_worker(settings), queue)
        dispatch = notification_tasks.sender(celery, queue)
        if dispatch_wrapper is not None:
            dispatch = dispatch_wrapper(dispatch)
        deps = webhook_deps(settings, components, dispatch)
        server = WebhookServer(create_webhook_app(deps), "127.0.0.1", 0)
        await server.start()
        webhook_url = f"http://127.0.0.1:{server.port}"
        push.config.push_endpoint = f"{webhook_url}/notifications/google"
        notifier.config.webhook_url = f"{webhook_url}/notifications/apple/v2"
        system = System(
            sim_url,
            play,
            sim_app[APPLE_STORE],
            notifier,
            push,
            wallet,
            settings,
            components,
            deps.inbox,
            BindingRepository(runtime.database),
            webhook_url,
            celery,
            queue,
        )
        try:
            if with_worker:
                with worker(celery, queue):
                    yield system
            else:
                yield system
        finally:
            await server.stop()
            await components.close()
            runtime.database.close()


async def credit_directly(wallet: Wallet, account_id: str, store: int, token: str, coins: int) -> None:
    """A purchase the wallet already holds (standing in for a store path that credited it)."""
    await wallet.stub.CreditPurchase(
        wpb.CreditPurchaseRequest(
            request_id=f"seed-{token}"[:128],
            account_id=account_id,
            store=store,  # type: ignore[arg-type]
            store_transaction_id=token,
            product_id="com.coinstore.coins.350",
            coins=coins,
            quantity=1,
            environment=wpb.STORE_ENVIRONMENT_PRODUCTION,
            storefront="US",
            price=money_pb2.Money(amount_minor=649, currency_code="USD"),
        ),
        metadata=wallet.md(),
        timeout=30,
    )
