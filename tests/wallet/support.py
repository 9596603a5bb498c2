"""A real wallet server on a free port over a fresh, migrated database, and helpers
to call it the way other services do."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from coinstore.type.v1 import money_pb2
from coinstore.wallet.v1 import wallet_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as pb_grpc
from services.common import migrate
from services.common.auth import TokenVerifier, load_public_keys
from services.common.bootstrap import Runtime
from services.common.catalog import load_catalog
from services.common.db import Database
from services.common.metrics import Metrics
from services.wallet.config import WalletSettings
from services.wallet.server import build_host
from tests.support.tokens import Keys

ALL_SCOPES = ("wallet:read", "wallet:gift", "wallet:limits", "wallet:credit", "wallet:reserve", "wallet:purchases")

CATALOG = """
[diamonds]
per_coin = "{per_coin}"
holding_days = {holding_days}

[[packs]]
store = "app_store"
product_id = "coins_100"
coins = 100
price = "1.99"
currency = "USD"

[[gifts]]
id = "rose"
name = "Rose"
coin_price = 1

[[gifts]]
id = "panda"
name = "Panda"
coin_price = 5

[[gifts]]
id = "odd"
name = "Odd"
coin_price = 3
"""

_counter = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:8]}"


def write_catalog(directory: Path, *, holding_days: int = 0, per_coin: str = "1") -> Path:
    path = directory / f"catalog-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(CATALOG.format(holding_days=holding_days, per_coin=per_coin))
    return path


def migrated(url: str) -> None:
    migrate.upgrade("wallet", url)


@dataclass
class ShiftedClock:
    """The wall clock, moved on by ``advance`` (so an expiry can pass without waiting for it)."""

    offset: timedelta = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, by: timedelta) -> None:
        self.offset += by


@dataclass
class Wallet:
    url: str
    port: int
    database: Database
    keys: Keys
    stub: pb_grpc.WalletServiceAsyncStub
    channel: grpc.aio.Channel
    clock: ShiftedClock = field(default_factory=ShiftedClock)  # the server's clock

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def md(self, *scopes: str) -> tuple[tuple[str, str], ...]:
        return self.keys.metadata(*(scopes or ALL_SCOPES))

    async def credit(
        self, account: str, coins: int, *, stx: str | None = None, bonus: int = 0, quantity: int = 1, **extra: Any
    ) -> pb.CreditPurchaseResponse:
        return await self.stub.CreditPurchase(
            credit_request(account, coins, stx=stx, bonus=bonus, quantity=quantity, **extra),
            metadata=self.md(),
            timeout=30,
        )

    async def balance(self, account: str) -> pb.Balance:
        reply = await self.stub.GetBalance(pb.GetBalanceRequest(account_id=account), metadata=self.md(), timeout=30)
        return reply.balance

    async def gift(
        self, sender: str, creator: str, gift_id: str = "rose", count: int = 1, request_id: str | None = None
    ) -> pb.SendGiftResponse:
        return await self.stub.SendGift(
            pb.SendGiftRequest(
                request_id=request_id or unique("g"),
                sender_account_id=sender,
                creator_account_id=creator,
                gift_id=gift_id,
                count=count,
                live_stream_id="live-1",
            ),
            metadata=self.md(),
            timeout=30,
        )


def credit_request(
    account: str,
    coins: int,
    *,
    stx: str | None = None,
    bonus: int = 0,
    quantity: int = 1,
    request_id: str | None = None,
    store: int = pb.STORE_APP_STORE,
    environment: int = pb.STORE_ENVIRONMENT_PRODUCTION,
) -> pb.CreditPurchaseRequest:
    return pb.CreditPurchaseRequest(
        request_id=request_id or unique("cr"),
        account_id=account,
        store=store,  # type: ignore[arg-type]
        store_transaction_id=stx or unique("stx"),
        product_id="coins_100",
        coins=coins,
        bonus_coins=bonus,
        quantity=quantity,
        environment=environment,  # type: ignore[arg-type]
        storefront="USA",
        price=money_pb2.Money(amount_minor=199 * quantity, currency_code="USD"),
    )


def settings_for(url: str, keys: Keys, catalog: Path, **overrides: Any) -> WalletSettings:
    return WalletSettings(
        database_url=url,
        catalog=catalog,
        auth_trusted_keys=(keys.public_path,),
        auth_signing_key=keys.private_path,
        shutdown_grace_seconds=1.0,
        db_pool_size=overrides.pop("db_pool_size", 8),
        **overrides,
    )


@asynccontextmanager
async def running_wallet(
    url: str,
    keys: Keys,
    tmp_path: Path,
    *,
    holding_days: int = 0,
    per_coin: str = "1",
    verifier: TokenVerifier | None = None,
    **overrides: Any,
) -> AsyncIterator[Wallet]:
    migrated(url)
    settings = settings_for(
        url, keys, write_catalog(tmp_path, holding_days=holding_days, per_coin=per_coin), **overrides
    )
    database = Database.from_url(url, settings.db_pool_size)
    runtime = Runtime(
        settings,
        database,
        verifier or TokenVerifier(load_public_keys([keys.public_path])),
        Metrics("wallet"),
        load_catalog(settings.catalog),
    )
    clock = ShiftedClock()
    host = build_host(settings, runtime, port=0, clock=clock)
    port = await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Wallet(url, port, database, keys, pb_grpc.WalletServiceStub(channel), channel, clock)
    finally:
        await channel.close(None)
        await host.stop()
        database.close()
