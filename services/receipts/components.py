"""Everything the receipts service's gRPC servicer and its webhook server need,
built once per process from the settings and the runtime.

``build_components(settings, runtime)`` must be called with an event loop
running (it opens the wallet's grpc.aio channel). Close with ``await
components.close()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from services.common.bootstrap import Runtime
from services.common.catalog import Catalog
from services.common.clients import aio_channel
from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.metrics import Metrics
from services.receipts.apple.client import AppStoreApi, TokenMinter, load_api_key
from services.receipts.apple.jws import AppleJwsVerifier, load_root_certificates
from services.receipts.apple.ocsp import HttpOcspChecker
from services.receipts.apple.rules import ApplePolicy
from services.receipts.apple.verify import ApplePurchases
from services.receipts.config import ReceiptsSettings
from services.receipts.google.verify import GooglePurchases
from services.receipts.google.wiring import build_google
from services.receipts.purchases.binding import Binding
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.repository import PurchaseStore
from services.receipts.purchases.rules import SandboxPolicy
from services.receipts.purchases.wallet import WalletClient

SERVICE = "receipts"
WALLET_SCOPES = ("wallet:credit",)


@dataclass
class Components:
    """The receipts service's adapters and domain services.

    - ``store``: purchases table and the AIP-155 request log;
    - ``wallet``: CreditPurchase / ReversePurchase / RestorePurchase client;
    - ``crediting``: the one exactly-once crediting path (also refunds);
    - ``binding``: appAccountToken / obfuscatedAccountId per account;
    - ``apple``: VerifyApplePurchase; ``apple.verifier`` verifies any Apple JWS
      (transactions, notifications), ``apple.api`` is the App Store Server API
      client, ``apple.policy`` the bundle id and accepted environments.
    - ``google``: VerifyGooglePurchase and ``google.credit_token`` (query Google
      and credit, for RTDN); ``google.client`` is the Android Publisher client
      (purchases v2/v1, consume, acknowledge, voided purchases).
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
    apple: ApplePurchases
    google: GooglePurchases

    async def close(self) -> None:
        await self.wallet.close()
        await self.apple.api.close()
        self.google.close()


def build_components(settings: ReceiptsSettings, runtime: Runtime, clock: Clock | None = None) -> Components:
    clock = clock or SystemClock()
    store = PurchaseStore(runtime.database)
    wallet = WalletClient(
        aio_channel(settings.wallet_address, runtime.token_source(SERVICE, WALLET_SCOPES)),
    )
    crediting = Crediting(
        store,
        wallet,
        runtime.catalog,
        settings.region_policy,
        clock,
        runtime.metrics,
        runtime.failpoints,
        SandboxPolicy.from_setting(settings.sandbox_accounts),
    )
    binding = Binding(settings.binding_secret)
    return Components(
        settings=settings,
        database=runtime.database,
        catalog=runtime.catalog,
        metrics=runtime.metrics,
        clock=clock,
        store=store,
        binding=binding,
        wallet=wallet,
        crediting=crediting,
        apple=build_apple(settings, crediting, binding, runtime.metrics),
        google=build_google(settings, crediting, runtime.catalog, binding, store, clock, runtime.metrics),
    )


def build_apple(settings: ReceiptsSettings, crediting: Crediting, binding: Binding, metrics: Metrics) -> ApplePurchases:
    """The App Store path. Unreadable root certificates or API key stop start-up (SettingsError)."""
    http = httpx.AsyncClient(timeout=settings.apple_api_timeout_seconds)
    ocsp = HttpOcspChecker(http, settings.apple_api_timeout_seconds) if settings.apple_online_checks else None
    verifier = AppleJwsVerifier(
        load_root_certificates(settings.apple_root_certs), online_checks=settings.apple_online_checks, ocsp=ocsp
    )
    tokens = TokenMinter(
        load_api_key(settings.apple_api_key_file),
        settings.apple_api_key_id,
        settings.apple_api_issuer_id,
        settings.apple_bundle_id,
    )
    api = AppStoreApi(
        http,
        tokens,
        production_url=settings.apple_api_url,
        sandbox_url=settings.apple_sandbox_api_url,
        timeout_seconds=settings.apple_api_timeout_seconds,
    )
    policy = ApplePolicy(settings.apple_bundle_id)
    return ApplePurchases(verifier, api, crediting, binding, policy, metrics)
