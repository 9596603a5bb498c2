"""Fixtures of the payouts tests: the PayPal simulator, a wallet, the payouts gRPC service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc
from services.common import migrate
from services.common.auth import TokenVerifier
from services.common.bootstrap import Runtime, key_ring
from services.common.catalog import load_catalog
from services.common.db import Database
from services.common.metrics import Metrics
from services.payouts.config import PayoutsSettings
from services.payouts.server import build_host
from tests.payouts.fake_wallet import FakeWallet, FakeWalletServer
from tests.payouts.harness import PayPalSimServer, payouts_settings, write_catalog
from tests.support.tokens import Keys


@pytest.fixture
def paypal(tmp_path: Path) -> Iterator[PayPalSimServer]:
    server = PayPalSimServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def fake_wallet() -> Iterator[FakeWalletServer]:
    server = FakeWalletServer()
    yield server
    server.stop()


@dataclass
class Service:
    stub: pb_grpc.PayoutServiceAsyncStub
    settings: PayoutsSettings
    keys: Keys
    wallet: FakeWallet
    paypal: PayPalSimServer
    database: Database
    address: str = ""

    def creator(self, *scopes: str) -> tuple[tuple[str, str], ...]:
        return self.keys.metadata(*(scopes or ("payouts:request",)), subject="app-backend")

    def ops(self) -> tuple[tuple[str, str], ...]:
        return self.keys.metadata("payouts:ops", subject="ops")


async def start_service(settings: PayoutsSettings) -> tuple[object, Database, grpc.aio.Channel]:
    migrate.upgrade("payouts", settings.database_url)
    database = Database.from_url(settings.database_url, 4)
    runtime = Runtime(
        settings,
        database,
        TokenVerifier(key_ring(settings)),
        Metrics("payouts"),
        load_catalog(settings.catalog),
        settings.failpoint_set(),
    )
    host = build_host(settings, runtime, port=0)
    await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
    return host, database, channel


@pytest.fixture
async def service(
    tmp_path: Path, database_url: str, keys: Keys, fake_wallet: FakeWalletServer, paypal: PayPalSimServer
) -> AsyncIterator[Service]:
    settings = payouts_settings(
        database_url=database_url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        catalog=write_catalog(tmp_path),
        keys=keys,
        wallet_address=fake_wallet.address,
        paypal_url=paypal.api_url,
    )
    host, database, channel = await start_service(settings)
    try:
        yield Service(
            pb_grpc.PayoutServiceStub(channel),
            settings,
            keys,
            fake_wallet.wallet,
            paypal,
            database,
            f"127.0.0.1:{host.port}",  # type: ignore[attr-defined]
        )
    finally:
        await channel.close(None)
        await host.stop()  # type: ignore[attr-defined]
        database.close()
