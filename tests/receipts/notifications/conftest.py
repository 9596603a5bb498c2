"""Fixtures of the notification tests: a migrated receipts database, the store
simulator's Pub/Sub side on a real port, a test Apple PKI, the webhook server
on a real port, and the receipts core over the real wallet (``core``)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services.common import migrate
from services.common.clock import SystemClock
from services.common.db import Database
from services.common.loop import LoopThread
from services.common.metrics import Metrics
from services.receipts.apple.jws import AppleJwsVerifier
from services.receipts.notifications.parse import AppleExpectations
from services.receipts.notifications.pubsub_auth import JwksCache, PubSubTokenVerifier
from services.receipts.notifications.repository import InboxRepository
from services.receipts.notifications.webhooks import WebhookDeps, WebhookLimits, WebhookServer, create_webhook_app
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.model import Refund, VerifiedPurchase
from services.receipts.wiring import Components, build_components
from services.storesim import apple as apple_sim
from services.storesim import pubsub
from services.storesim.config import StoresimSettings
from tests.receipts.google.support import google_settings, play_simulator_thread
from tests.receipts.support import ledger, receipts_settings, runtime_for
from tests.support.tokens import Keys
from tests.wallet.support import Wallet, running_wallet

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


def core_verifier(store: apple_sim.AppleStore) -> AppleJwsVerifier:
    """The receipts core's verifier (the one VerifyApplePurchase uses) trusting ``store``'s root."""
    return AppleJwsVerifier([store.pki.root])


@dataclass
class Webhook:
    url: str
    inbox: InboxRepository
    dispatched: list[int] = field(default_factory=list)
    metrics: Metrics = field(default_factory=lambda: Metrics("receipts"))

    async def post(self, path: str, body: Any, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with session.post(self.url + path, headers=dict(headers or {}), **kwargs) as response:
                text = await response.text()
                return response.status, text


@asynccontextmanager
async def running_webhook(
    receipts_db: Database, sim: Sim, apple_store: apple_sim.AppleStore, limits: WebhookLimits | None = None
) -> AsyncIterator[Webhook]:
    """The webhook server on a free port, with ``limits`` (the defaults when None)."""
    lock = threading.Lock()
    dispatched: list[int] = []

    def dispatch(notification_id: int) -> None:
        with lock:
            dispatched.append(notification_id)

    metrics = Metrics("receipts")
    inbox = InboxRepository(receipts_db)
    deps = WebhookDeps(
        inbox=inbox,
        apple_verifier=core_verifier(apple_store),
        apple=AppleExpectations("com.coinstore.app", 1234567890),
        pubsub=PubSubTokenVerifier(JwksCache(sim.jwks_url, refresh_cooldown=0.0), AUDIENCE, SERVICE_ACCOUNT),
        package_name=PACKAGE,
        dispatch=dispatch,
        metrics=metrics,
        clock=SystemClock(),
        limits=limits or WebhookLimits(),
    )
    server = WebhookServer(create_webhook_app(deps), "127.0.0.1", 0)
    await server.start()
    sim.push.config.push_endpoint = f"http://127.0.0.1:{server.port}/notifications/google"
    try:
        yield Webhook(f"http://127.0.0.1:{server.port}", inbox, dispatched, metrics)
    finally:
        await server.stop()


@pytest.fixture
async def webhook(receipts_db: Database, sim: Sim, apple_store: apple_sim.AppleStore) -> AsyncIterator[Webhook]:
    async with running_webhook(receipts_db, sim, apple_store) as running:
        yield running


def count_calls(crediting: Crediting) -> list[tuple[str, str]]:
    """Every call of the core's use cases from now on, as (use case, store transaction
    id), recorded before it runs: for tests where exactly one call is the requirement
    (what a call moved is read from the wallet)."""
    calls: list[tuple[str, str]] = []
    lock = threading.Lock()

    def counted(name: str, key: Callable[..., str]) -> None:
        use_case = getattr(crediting, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            with lock:
                calls.append((name, key(*args)))
            return await use_case(*args, **kwargs)

        setattr(crediting, name, call)

    def purchase_key(purchase: VerifiedPurchase, *_: Any) -> str:
        return purchase.store_transaction_id

    def refund_key(refund: Refund) -> str:
        return refund.store_transaction_id

    counted("credit", purchase_key)
    counted("record", purchase_key)
    counted("apply_refund", refund_key)
    counted("restore", lambda _store, store_transaction_id: str(store_transaction_id))
    return calls


class Core:
    """The receipts core (build_components, as the worker builds it) in front of the
    REAL wallet service and the Play simulator, for synchronous callers such as the
    inbox processor. The core and the wallet run on their own event loop thread
    (``loop``); every effect is read back from the wallet, and ``calls`` lists every
    call of the core's use cases."""

    def __init__(self, database_url: str, keys: Keys, tmp_path: Path) -> None:
        self.loop = LoopThread()
        self._stack = ExitStack()
        self._async_stack = AsyncExitStack()
        self.play, base = self._stack.enter_context(play_simulator_thread(tmp_path / "play"))
        self.wallet: Wallet = self.loop.run(
            self._async_stack.enter_async_context(running_wallet(database_url, keys, tmp_path))
        )
        self.settings = settings = receipts_settings(
            keys,
            database_url,
            self.wallet.port,
            tmp_path / "storesim",
            **google_settings(self.play, base, tmp_path),
        )
        self._runtime = runtime_for(settings)

        async def build() -> Components:
            return build_components(settings, self._runtime)

        self.components = self.loop.run(build())
        self.calls = count_calls(self.components.crediting)

    def balance(self, account_id: str) -> int:
        return self.loop.run(self.wallet.balance(account_id)).coins

    def ledger(self, account_id: str) -> list[tuple[str, int]]:
        return self.loop.run(ledger(self.wallet, account_id))

    def close(self) -> None:
        try:
            self.loop.run(self.components.close())
            self._runtime.database.close()
            self.loop.run(self._async_stack.aclose())
        finally:
            self._stack.close()
            self.loop.close()


@pytest.fixture
def core(database_url: str, keys: Keys, tmp_path: Path) -> Iterator[Core]:
    core = Core(database_url, keys, tmp_path)
    try:
        yield core
    finally:
        core.close()
