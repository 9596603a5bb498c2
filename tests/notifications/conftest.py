"""Fixtures of the notification tests: a migrated receipts database, the store
simulator's Pub/Sub side on a real port, a test Apple PKI, and the webhook
server on a real port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services.common import migrate
from services.common.clock import SystemClock
from services.common.db import Database
from services.common.metrics import Metrics
from services.receipts.appstore.jws import AppleJwsVerifier
from services.receipts.notifications.core import CoreAppleVerifier
from services.receipts.notifications.oidc import JwksCache, PubSubTokenVerifier
from services.receipts.notifications.parse import AppleExpectations
from services.receipts.notifications.ports import Applied
from services.receipts.notifications.store import InboxStore
from services.receipts.webhooks import WebhookDeps, WebhookServer, create_webhook_app
from services.storesim import apple as apple_sim
from services.storesim import pubsub
from services.storesim.config import StoresimSettings

AUDIENCE = "https://receipts.test/notifications/google"
SERVICE_ACCOUNT = "pubsub-push@coinstore-test.iam.gserviceaccount.com"
PACKAGE = "com.coinstore.app"


@pytest.fixture
def receipts_db(database_url: str) -> Iterator[Database]:
    migrate.upgrade("receipts", database_url)
    database = Database.from_url(database_url, 8)
    try:
        yield database
    finally:
        database.close()


@dataclass
class Sim:
    url: str
    push: pubsub.PubSubPush

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/pubsub/jwks"


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Sim]:
    """The simulator's Pub/Sub side alone, on a free port."""
    app = web.Application()
    pubsub.setup(app, StoresimSettings(state_dir=tmp_path / "storesim"))
    push = app[pubsub.PUBSUB]
    push.config.audience = AUDIENCE
    push.config.service_account = SERVICE_ACCOUNT
    push.config.retry_initial_seconds = 0.05
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Sim(f"http://127.0.0.1:{port}", push)
    finally:
        await runner.cleanup()


@pytest.fixture(scope="session")
def apple_store(tmp_path_factory: pytest.TempPathFactory) -> apple_sim.AppleStore:
    """The App Store simulator's state: its signer is the chain our roots trust."""
    return apple_sim.create_store(tmp_path_factory.mktemp("apple-sim"))


@pytest.fixture(scope="session")
def foreign_store(tmp_path_factory: pytest.TempPathFactory) -> apple_sim.AppleStore:
    """Another App Store simulator: a valid chain, but to a root we do not trust."""
    return apple_sim.create_store(tmp_path_factory.mktemp("apple-foreign"))


def core_verifier(store: apple_sim.AppleStore, loop: asyncio.AbstractEventLoop) -> CoreAppleVerifier:
    """The receipts core's verifier (the one VerifyApplePurchase uses) trusting ``store``'s root."""
    return CoreAppleVerifier(AppleJwsVerifier([store.pki.root]), loop)


@dataclass
class Webhook:
    url: str
    inbox: InboxStore
    dispatched: list[int] = field(default_factory=list)
    metrics: Metrics = field(default_factory=lambda: Metrics("receipts"))

    async def post(self, path: str, body: Any, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with session.post(self.url + path, headers=dict(headers or {}), **kwargs) as response:
                text = await response.text()
                return response.status, text


@pytest.fixture
async def webhook(receipts_db: Database, sim: Sim, apple_store: apple_sim.AppleStore) -> AsyncIterator[Webhook]:
    lock = threading.Lock()
    dispatched: list[int] = []

    def dispatch(notification_id: int) -> None:
        with lock:
            dispatched.append(notification_id)

    metrics = Metrics("receipts")
    inbox = InboxStore(receipts_db)
    deps = WebhookDeps(
        inbox=inbox,
        apple_verifier=core_verifier(apple_store, asyncio.get_running_loop()),
        apple=AppleExpectations("com.coinstore.app", 1234567890, ("Production", "Sandbox")),
        pubsub=PubSubTokenVerifier(JwksCache(sim.jwks_url, refresh_cooldown=0.0), AUDIENCE, SERVICE_ACCOUNT),
        package_name=PACKAGE,
        dispatch=dispatch,
        metrics=metrics,
        clock=SystemClock(),
    )
    server = WebhookServer(create_webhook_app(deps), "127.0.0.1", 0)
    await server.start()
    sim.push.config.push_endpoint = f"http://127.0.0.1:{server.port}/notifications/google"
    try:
        yield Webhook(f"http://127.0.0.1:{server.port}", inbox, dispatched, metrics)
    finally:
        await server.stop()


class FakeLedger:
    """The core's exactly-once paths, in memory: credits keyed by store
    transaction, state-based reversal by cumulative share. Thread-safe."""

    def __init__(self, coins_per_pack: int = 100) -> None:
        self.coins_per_pack = coins_per_pack
        self.balances: dict[str, int] = {}
        self.purchases: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def add_purchase(self, store: str, txid: str, account: str, quantity: int = 1) -> None:
        with self._lock:
            coins = self.coins_per_pack * quantity
            self.purchases[(store, txid)] = {"account": account, "quantity": quantity, "coins": coins, "reversed": 0}
            self.balances[account] = self.balances.get(account, 0) + coins

    def credit_apple(self, account_id: str, transaction: Mapping[str, Any], request_id: str) -> Applied:
        with self._lock:
            self.calls.append(("credit", str(transaction["transactionId"])))
            key = ("APP_STORE", str(transaction["transactionId"]))
            if key in self.purchases:
                return Applied(False)
        self.add_purchase(*key, account_id, int(transaction.get("quantity") or 1))
        return Applied(True)

    def record_apple(self, transaction: Mapping[str, Any]) -> None:
        with self._lock:
            self.calls.append(("record", str(transaction["transactionId"])))

    def credit_google(self, account_id: str | None, product_id: str, purchase_token: str, request_id: str) -> Applied:
        with self._lock:
            self.calls.append(("credit", purchase_token))
            if account_id is None:
                return Applied(False, "recorded")
            if ("GOOGLE_PLAY", purchase_token) in self.purchases:
                return Applied(False)
        self.add_purchase("GOOGLE_PLAY", purchase_token, account_id)
        return Applied(True)

    def reverse(
        self,
        *,
        store: str,
        store_transaction_id: str,
        refunded_quantity: int,
        refunded_percentage_milli: int,
        reason: str,
        request_id: str,
    ) -> Applied:
        with self._lock:
            self.calls.append(("reverse", store_transaction_id))
            purchase = self.purchases.get((store, store_transaction_id))
            if purchase is None:
                return Applied(False, "unknown")
            if refunded_percentage_milli:
                target = purchase["coins"] * refunded_percentage_milli // 100_000
            elif refunded_quantity:
                target = purchase["coins"] * refunded_quantity // purchase["quantity"]
            else:
                target = purchase["coins"]
            delta = target - purchase["reversed"]
            if delta <= 0:
                return Applied(False)
            purchase["reversed"] = target
            self.balances[purchase["account"]] -= delta
            return Applied(True)

    def restore(self, *, store: str, store_transaction_id: str, reason: str, request_id: str) -> Applied:
        with self._lock:
            self.calls.append(("restore", store_transaction_id))
            purchase = self.purchases.get((store, store_transaction_id))
            if purchase is None or purchase["reversed"] == 0:
                return Applied(False)
            self.balances[purchase["account"]] += purchase["reversed"]
            purchase["reversed"] = 0
            return Applied(True)
