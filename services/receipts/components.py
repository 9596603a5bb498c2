"""Everything the receipts service's gRPC servicer and its webhook server need,
built once per process from the settings and the runtime.

``build_components(settings, runtime)`` must be called with an event loop
running (it opens the wallet's grpc.aio channel). Close with ``await
components.close()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.bootstrap import Runtime
from services.common.catalog import Catalog
from services.common.clients import aio_channel
from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.metrics import Metrics
from services.receipts.config import ReceiptsSettings
from services.receipts.crediting import Crediting
from services.receipts.domain.binding import Binding
from services.receipts.store import PurchaseStore
from services.receipts.wallet import WalletClient

SERVICE = "receipts"
WALLET_SCOPES = ("wallet:credit",)


@dataclass
class Components:
    """The receipts service's adapters and domain services.

    - ``store``: purchases table and the AIP-155 request log;
    - ``wallet``: CreditPurchase / ReversePurchase / RestorePurchase client;
    - ``crediting``: the one exactly-once crediting path (also refunds);
    - ``binding``: appAccountToken / obfuscatedAccountId per account;
    """

    settings: ReceiptsSettings
    database: Database
    catalog: Catalog
    metrics: Metrics
    clock: Clock
    store: PurchaseStore
    binding: Binding
    wallet: WalletClient
    crediting: Crediting

    async def close(self) -> None:
        await self.wallet.close()


def build_components(settings: ReceiptsSettings, runtime: Runtime, clock: Clock | None = None) -> Components:
    clock = clock or SystemClock()
    store = PurchaseStore(runtime.database)
    wallet = WalletClient(
        aio_channel(settings.wallet_address, runtime.token_source(SERVICE, WALLET_SCOPES)),
    )
    crediting = Crediting(store, wallet, runtime.catalog, settings.region_policy, clock, runtime.metrics)
    return Components(
        settings=settings,
        database=runtime.database,
        catalog=runtime.catalog,
        metrics=runtime.metrics,
        clock=clock,
        store=store,
        binding=Binding(settings.binding_secret),
        wallet=wallet,
        crediting=crediting,
    )
