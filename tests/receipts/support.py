"""Test harness of the receipts service: a fake WalletService on a real port
(exactly once per store transaction, like the real wallet's contract) and a
real receipts gRPC host wired by ``build_components``."""

from __future__ import annotations

import asyncio
import hashlib
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
from services.receipts.components import Components, build_components
from services.receipts.config import ReceiptsSettings
from services.receipts.server import build_host_with
from services.storesim import apple as apple_sim
from tests.support.grpc_server import running_host
from tests.support.tokens import Keys

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Credit:
    account_id: str
    coins: int
    request: wpb.CreditPurchaseRequest
    reversed_coins: int = 0


@dataclass
class FakeWallet(wpb_grpc.WalletServiceServicer):
    """Exactly once per (store, store_transaction_id); bound to the first account."""

    credits: dict[tuple[int, str], Credit] = field(default_factory=dict)
    balances: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    callers: list[str] = field(default_factory=list)
    down: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # AIP-155 like the real wallet: the same request id gets the original answer.
    answers: dict[str, wpb.CreditPurchaseResponse] = field(default_factory=dict)

    async def CreditPurchase(self, request: wpb.CreditPurchaseRequest, context: Any) -> wpb.CreditPurchaseResponse:
        self.calls.append("CreditPurchase")
        if self.down:
            raise errors.Unavailable("DATABASE_UNAVAILABLE", "down")
        async with self.lock:
            await asyncio.sleep(0.002)
            if request.request_id in self.answers:
                return self.answers[request.request_id]
            key = (request.store, request.store_transaction_id)
            existing = self.credits.get(key)
            if existing is not None:
                if existing.account_id != request.account_id:
                    raise errors.PermissionDenied("RECEIPT_BOUND_TO_OTHER_ACCOUNT", "bound to another account")
                state = wpb.CREDIT_STATE_ALREADY_CREDITED
            else:
                self.credits[key] = Credit(request.account_id, request.coins, request)
                self.balances[request.account_id] = self.balances.get(request.account_id, 0) + request.coins
                state = wpb.CREDIT_STATE_CREDITED
            answer = wpb.CreditPurchaseResponse(
                state=state,
                transaction_id=f"ltx-{hashlib.sha256(request.store_transaction_id.encode()).hexdigest()[:32]}",
                coins_credited=request.coins,
                bonus_coins=request.bonus_coins,
                balance=wpb.Balance(account_id=request.account_id, coins=self.balances[request.account_id]),
            )
            self.answers[request.request_id] = answer
            return answer

    async def ReversePurchase(self, request: wpb.ReversePurchaseRequest, context: Any) -> wpb.ReversePurchaseResponse:
        self.calls.append("ReversePurchase")
        async with self.lock:
            credit = self.credits.get((request.store, request.store_transaction_id))
            if credit is None:
                raise errors.NotFound("PURCHASE_NOT_FOUND", "no such purchase")
            quantity = credit.request.quantity
            if request.refunded_percentage_milli:
                target = credit.coins * request.refunded_percentage_milli // 100_000
            elif request.refunded_quantity:
                target = credit.coins * request.refunded_quantity // quantity
            else:
                target = credit.coins
            delta = target - credit.reversed_coins
            credit.reversed_coins = target
            self.balances[credit.account_id] -= delta
            return wpb.ReversePurchaseResponse(
                state=wpb.REVERSAL_STATE_APPLIED if delta else wpb.REVERSAL_STATE_ALREADY_APPLIED,
                coins_reversed=delta,
                account_id=credit.account_id,
                balance=wpb.Balance(account_id=credit.account_id, coins=self.balances[credit.account_id]),
            )

    async def RestorePurchase(self, request: wpb.RestorePurchaseRequest, context: Any) -> wpb.RestorePurchaseResponse:
        self.calls.append("RestorePurchase")
        async with self.lock:
            credit = self.credits.get((request.store, request.store_transaction_id))
            if credit is None:
                raise errors.NotFound("PURCHASE_NOT_FOUND", "no such purchase")
            delta = credit.reversed_coins
            credit.reversed_coins = 0
            self.balances[credit.account_id] += delta
            return wpb.RestorePurchaseResponse(
                state=wpb.REVERSAL_STATE_APPLIED if delta else wpb.REVERSAL_STATE_ALREADY_APPLIED,
                coins_restored=delta,
                account_id=credit.account_id,
                balance=wpb.Balance(account_id=credit.account_id, coins=self.balances[credit.account_id]),
            )


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
    host = build_host_with(components, runtime, port=0)
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
