"""Test harness of the receipts service: a real receipts gRPC host wired by
``build_components``, in front of either the real wallet service
(``receipts_with_wallet``: what gets credited, and how often) or a fake
WalletService on a real port that records every call (``receipts_service``:
what the receipts service asked the wallet)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from coinstore.receipts.v1 import receipt_service_pb2_grpc as rpb_grpc
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as wpb_grpc
from services.common import errors, migrate
from services.common.auth import TokenVerifier, load_public_keys
from services.common.bootstrap import Runtime
from services.common.catalog import load_catalog
from services.common.db import Database
from services.common.metrics import Metrics
from services.common.settings import load_settings
from services.receipts.config import ReceiptsSettings
from services.receipts.wiring import Components, build_components, build_host
from services.storesim import apple as apple_sim
from tests.support.grpc_server import running_host
from tests.support.tokens import Keys
from tests.wallet.support import Wallet, running_wallet

REPO = Path(__file__).resolve().parents[2]


@dataclass
class FakeWallet(wpb_grpc.WalletServiceServicer):
    """A WalletService stand-in that answers every call and remembers each one.

    It deduplicates nothing: exactly once per store transaction is the real
    wallet's guarantee, and tests of it go through the real wallet
    (``receipts_with_wallet``). What this fake can tell honestly is what the
    receipts service asked: every CreditPurchase, ReversePurchase and
    RestorePurchase that reached it, in order. ``credit_state`` is what every
    credit answers, ``balances`` the coins of every credit received (a
    repeated credit counts twice), ``down`` answers UNAVAILABLE, ``refuse`` is raised
    to every credit, and while ``stall`` is set a credit batch waits for it to be cleared."""

    credits: list[wpb.CreditPurchaseRequest] = field(default_factory=list)
    reversals: list[wpb.ReversePurchaseRequest] = field(default_factory=list)
    restores: list[wpb.RestorePurchaseRequest] = field(default_factory=list)
    balances: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    credit_state: wpb.CreditState.ValueType = wpb.CREDIT_STATE_CREDITED
    down: bool = False
    refuse: errors.DomainError | None = None
    stall: asyncio.Event | None = None

    def credits_of(self, store_transaction_id: str) -> list[wpb.CreditPurchaseRequest]:
        return [c for c in self.credits if c.store_transaction_id == store_transaction_id]

    def only_credit(self, store_transaction_id: str) -> wpb.CreditPurchaseRequest:
        """The one CreditPurchase received for this store transaction (fails on none or several)."""
        (credit,) = self.credits_of(store_transaction_id)
        return credit

    async def CreditPurchase(self, request: wpb.CreditPurchaseRequest, context: Any) -> wpb.CreditPurchaseResponse:
        self.calls.append("CreditPurchase")
        if self.down:
            raise errors.Unavailable("DATABASE_UNAVAILABLE", "down")
        if self.refuse is not None:
            raise self.refuse
        self.credits.append(request)
        balance = self.balances[request.account_id] = self.balances.get(request.account_id, 0) + request.coins
        return wpb.CreditPurchaseResponse(
            state=self.credit_state,
            transaction_id=f"ltx-{len(self.credits)}",
            coins_credited=request.coins,
            bonus_coins=request.bonus_coins,
            balance=wpb.Balance(account_id=request.account_id, coins=balance),
        )

    async def CreditPurchases(self, request: wpb.CreditPurchasesRequest, context: Any) -> wpb.CreditPurchasesResponse:
        """Each item as a CreditPurchase of its own (recorded in ``credits``)."""
        self.calls.append("CreditPurchases")
        if self.stall is not None:
            await self.stall.wait()
        if self.down:
            raise errors.Unavailable("DATABASE_UNAVAILABLE", "down")
        results = [
            wpb.CreditPurchaseResult(response=await self.CreditPurchase(one, context)) for one in request.requests
        ]
        return wpb.CreditPurchasesResponse(results=results)

    async def ReversePurchase(self, request: wpb.ReversePurchaseRequest, context: Any) -> wpb.ReversePurchaseResponse:
        self.calls.append("ReversePurchase")
        self.reversals.append(request)
        return wpb.ReversePurchaseResponse(state=wpb.REVERSAL_STATE_APPLIED)

    async def RestorePurchase(self, request: wpb.RestorePurchaseRequest, context: Any) -> wpb.RestorePurchaseResponse:
        self.calls.append("RestorePurchase")
        self.restores.append(request)
        return wpb.RestorePurchaseResponse(state=wpb.REVERSAL_STATE_APPLIED)


@asynccontextmanager
async def fake_wallet(keys: Keys, database_url: str) -> AsyncIterator[tuple[FakeWallet, int]]:
    """The fake wallet behind the real interceptor (so the receipts token and scope are checked)."""
    wallet = FakeWallet()  # type: ignore[abstract]
    database = Database.from_url(database_url, 2)

    def register(server: grpc.aio.Server) -> None:
        wpb_grpc.add_WalletServiceServicer_to_server(wallet, server)  # type: ignore[abstract]

    try:
        async with running_host(
            name="wallet", files=[wpb.DESCRIPTOR], register=register, database=database, public_key=keys.public_path
        ) as host:
            yield wallet, host.port
    finally:
        database.close()


def receipts_settings(
    keys: Keys, database_url: str, wallet_port: int, state_dir: Path, **extra: str
) -> ReceiptsSettings:
    """Settings for a test receipts service. The App Store simulator's root and
    In-App Purchase key are created under ``state_dir`` (as `make run` does)."""
    apple_sim.create_store(state_dir)
    environ: dict[str, str] = {
        "COINSTORE_APPLE_ROOT_CERTS": str(state_dir / "apple" / "root.der"),
        "COINSTORE_APPLE_API_KEY_FILE": str(state_dir / "apple" / "SubscriptionKey.p8"),
        "COINSTORE_APPLE_API_TIMEOUT_SECONDS": "2",
        "COINSTORE_DATABASE_URL": database_url,
        "COINSTORE_CATALOG": str(REPO / "deploy" / "catalog.toml"),
        "COINSTORE_AUTH_TRUSTED_KEYS": str(keys.public_path),
        "COINSTORE_AUTH_SIGNING_KEY": str(keys.private_path),
        "COINSTORE_WALLET_ADDRESS": f"127.0.0.1:{wallet_port}",
        "COINSTORE_DB_POOL_SIZE": "8",
    }
    environ.update({f"COINSTORE_{k.upper()}": v for k, v in extra.items()})
    return load_settings(ReceiptsSettings, environ)


def runtime_for(settings: ReceiptsSettings, metrics: Metrics | None = None) -> Runtime:
    migrate.upgrade("receipts", settings.database_url)
    return Runtime(
        settings,
        Database.from_url(settings.database_url, settings.db_pool_size),
        TokenVerifier(load_public_keys(list(settings.auth_trusted_keys))),
        metrics or Metrics("receipts"),
        load_catalog(settings.catalog),
    )


@dataclass
class Receipts:
    components: Components
    stub: rpb_grpc.ReceiptServiceAsyncStub
    wallet: FakeWallet
    keys: Keys

    def md(self, *scopes: str) -> tuple[tuple[str, str], ...]:
        return self.keys.metadata(*(scopes or ("purchases:verify",)), subject="app-backend")


@asynccontextmanager
async def receipts_host(
    keys: Keys,
    database_url: str,
    state_dir: Path,
    wallet_address: str,
    settings_extra: Mapping[str, str] | None = None,
) -> AsyncIterator[tuple[Components, rpb_grpc.ReceiptServiceAsyncStub]]:
    """A real receipts gRPC host (components built from settings) on a free port."""
    port = int(wallet_address.rsplit(":", 1)[1])
    settings = receipts_settings(keys, database_url, port, state_dir, **dict(settings_extra or {}))
    runtime = runtime_for(settings)
    components = build_components(settings, runtime)
    host = build_host(components, runtime, port=0)
    await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            yield components, rpb_grpc.ReceiptServiceStub(channel)
    finally:
        await host.stop()
        await components.close()
        runtime.database.close()


@asynccontextmanager
async def receipts_service(
    keys: Keys,
    database_url: str,
    state_dir: Path,
    settings_extra: Mapping[str, str] | None = None,
) -> AsyncIterator[Receipts]:
    """A real receipts gRPC host in front of the fake wallet."""
    async with (
        fake_wallet(keys, f"sqlite:///{state_dir / 'fake-wallet.db'}") as (wallet, wallet_port),
        receipts_host(keys, database_url, state_dir, f"127.0.0.1:{wallet_port}", settings_extra) as (
            components,
            stub,
        ),
    ):
        yield Receipts(components, stub, wallet, keys)


async def ledger(wallet: Wallet, account_id: str) -> list[tuple[str, int]]:
    """The account's purchase movements in the real wallet's ledger, oldest first:
    (store transaction id, coins delta) per credit, reversal or restore."""
    reply = await wallet.stub.ListTransactions(
        wpb.ListTransactionsRequest(account_id=account_id, page_size=500), metadata=wallet.md(), timeout=30
    )
    return [(t.reference, t.coins_delta) for t in reversed(reply.transactions)]


@dataclass
class WalletReceipts:
    """A real receipts host in front of the real wallet service, on one database."""

    components: Components
    stub: rpb_grpc.ReceiptServiceAsyncStub
    wallet: Wallet
    keys: Keys

    def md(self, *scopes: str) -> tuple[tuple[str, str], ...]:
        return self.keys.metadata(*(scopes or ("purchases:verify",)), subject="app-backend")

    async def balance(self, account_id: str) -> int:
        return (await self.wallet.balance(account_id)).coins

    async def ledger(self, account_id: str) -> list[tuple[str, int]]:
        return await ledger(self.wallet, account_id)


@asynccontextmanager
async def receipts_with_wallet(
    keys: Keys, database_url: str, state_dir: Path, settings_extra: Mapping[str, str] | None = None
) -> AsyncIterator[WalletReceipts]:
    """A real receipts gRPC host and the real wallet service, sharing ``database_url`` like production."""
    async with (
        running_wallet(database_url, keys, state_dir) as wallet,
        receipts_host(keys, database_url, state_dir, wallet.address, settings_extra) as (components, stub),
    ):
        yield WalletReceipts(components, stub, wallet, keys)


@asynccontextmanager
async def apple_simulator(state_dir: Path) -> AsyncIterator[tuple[apple_sim.AppleStore, str]]:
    """The App Store simulator on a free port: (its store, base URL)."""
    store = apple_sim.create_store(state_dir)
    app = web.Application()
    apple_sim.add_routes(app, store)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield store, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def simulator_settings(base_url: str) -> dict[str, str]:
    return {
        "APPLE_API_URL": f"{base_url}/apple/production",
        "APPLE_SANDBOX_API_URL": f"{base_url}/apple/sandbox",
    }
