"""The one composition root of the receipts service: every adapter and use case
is built here from the settings, for the gRPC service and its webhooks
(``python -m services.receipts``), the Celery worker (``python -m
services.receipts.worker``, whose tasks are registered here too) and the CLI.

``build_components`` must be called with an event loop running (it opens the
wallet's grpc.aio channel); close what it built with ``await components.close()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from celery import Celery

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from coinstore.receipts.v1 import receipt_service_pb2_grpc as pb_grpc
from services.common.bootstrap import Runtime, build_runtime, token_source
from services.common.catalog import Catalog, StoreId
from services.common.celery_app import make_celery_app
from services.common.clients import aio_channel
from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.failpoints import Failpoints
from services.common.loop import LoopThread, OnLoop
from services.common.metrics import Metrics
from services.common.outbound import OutboundPolicy
from services.common.server import ServerOptions, ServiceHost
from services.receipts.apple.client import AppStoreApi, TokenMinter, load_api_key
from services.receipts.apple.consumption import ConsentRepository, WalletConsumptionFacts
from services.receipts.apple.jws import AppleJwsVerifier, load_root_certificates
from services.receipts.apple.ocsp import HttpOcspChecker
from services.receipts.apple.rules import ApplePolicy
from services.receipts.apple.verify import ApplePurchases
from services.receipts.config import ReceiptsSettings, TokenlessPolicy
from services.receipts.errors import Refusals
from services.receipts.google import tasks as google_tasks
from services.receipts.google.client import PlayClient
from services.receipts.google.consume import Consumer, OverdueCollector
from services.receipts.google.repository import ConsumptionRepository, CreditedPlayPurchase
from services.receipts.google.rules import GooglePolicy
from services.receipts.google.tasks import CreditedPlay
from services.receipts.google.verify import GooglePurchases
from services.receipts.notifications import tasks as notification_tasks
from services.receipts.notifications.handle import InboxProcessor, NotificationHandler
from services.receipts.notifications.parse import AppleExpectations
from services.receipts.notifications.pubsub_auth import JwksCache, PubSubTokenVerifier
from services.receipts.notifications.reconcile import Promise, Reconciler, UncheckedAgeCollector
from services.receipts.notifications.repository import (
    CursorRepository,
    DeadLetterPolicy,
    InboxRepository,
    ReconcileRunRepository,
    RetryPolicy,
)
from services.receipts.notifications.tasks import NotificationWorker
from services.receipts.notifications.webhooks import (
    InboxCollector,
    WebhookDeps,
    WebhookLimits,
    WebhookServer,
    create_webhook_app,
)
from services.receipts.purchases import tasks as purchase_tasks
from services.receipts.purchases.binding import Binding
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.model import Environment
from services.receipts.purchases.outbox import OutboxRepository, PurchaseBatches
from services.receipts.purchases.refunds import RefundRepository
from services.receipts.purchases.repository import BindingRepository, PurchaseRepository
from services.receipts.purchases.rules import SandboxPolicy
from services.receipts.purchases.tasks import CreditSweeper
from services.receipts.purchases.wallet import WalletClient
from services.receipts.servicer import ReceiptServiceServicer

SERVICE = "receipts"

log = logging.getLogger(__name__)
WALLET_SCOPES = ("wallet:credit", "wallet:purchases", "wallet:read")


@dataclass
class Components:
    """The receipts service's adapters and use cases, one of each per process.

    - ``purchases``: the purchases table and the AIP-155 request log; ``bindings``:
      which account each appAccountToken / obfuscatedAccountId was handed to;
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
    purchases: PurchaseRepository
    bindings: BindingRepository
    binding: Binding
    wallet: WalletClient
    crediting: Crediting
    apple: ApplePurchases
    google: GooglePurchases

    async def close(self) -> None:
        await self.wallet.close()
        await self.apple.api.close()
        await self.google.aclose()


def build_components(settings: ReceiptsSettings, runtime: Runtime, clock: Clock | None = None) -> Components:
    clock = clock or SystemClock()
    purchases = PurchaseRepository(runtime.database)
    batching = settings.batching
    wallet = WalletClient(
        aio_channel(settings.wallet_address, runtime.token_source(SERVICE, WALLET_SCOPES)),
        settings.wallet_call_timeout_seconds,
        batching=batching,
    )
    crediting = Crediting(
        purchases,
        RefundRepository(runtime.database),
        wallet,
        runtime.catalog,
        settings.region_policy,
        clock,
        runtime.metrics,
        runtime.failpoints,
        SandboxPolicy.from_setting(settings.sandbox_accounts),
        PurchaseBatches(OutboxRepository(purchases), batching),
        sweep_wave=batching.max_batch,
    )
    binding = binding_from_settings(settings, clock)
    return Components(
        settings=settings,
        database=runtime.database,
        catalog=runtime.catalog,
        metrics=runtime.metrics,
        clock=clock,
        purchases=purchases,
        bindings=BindingRepository(runtime.database),
        binding=binding,
        wallet=wallet,
        crediting=crediting,
        apple=_apple(settings, crediting, binding, runtime.metrics),
        google=_google(settings, crediting, runtime.catalog, binding, purchases, clock, runtime.metrics),
    )


def binding_from_settings(settings: ReceiptsSettings, clock: Clock) -> Binding:
    """The binding secrets; retired ones past their keep time are named at start-up (they verify nothing)."""
    binding = Binding(
        settings.binding_secret,
        settings.binding_retired_secrets,
        keep_days=settings.binding_retired_keep_days,
        clock=clock,
    )
    for expired in binding.expired():
        log.warning(
            "COINSTORE_BINDING_RETIRED_SECRETS: the secret retired %s is past its %d days and verifies nothing;"
            " remove it",
            expired.retired_on,
            settings.binding_retired_keep_days,
        )
    return binding


def _apple(settings: ReceiptsSettings, crediting: Crediting, binding: Binding, metrics: Metrics) -> ApplePurchases:
    """The App Store path. Unreadable root certificates or API key stop start-up (SettingsError)."""
    outbound = OutboundPolicy.from_settings(settings)
    http = outbound.async_client(settings.apple_api_timeout_seconds)
    ocsp = (
        # OCSP is http by specification (RFC 6960; its answers are signed).
        HttpOcspChecker(
            outbound.async_client(settings.apple_api_timeout_seconds, plain_http_allowed=True),
            settings.apple_api_timeout_seconds,
        )
        if settings.apple_online_checks
        else None
    )
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
    policy = ApplePolicy(
        settings.apple_bundle_id, require_token=settings.apple_tokenless_purchases is TokenlessPolicy.REFUSE
    )
    refusals = Refusals(metrics, "coinstore_receipts_apple_refusals", "App Store proofs refused, by reason")
    return ApplePurchases(verifier, api, crediting, binding, policy, refusals)


def _play_client(settings: ReceiptsSettings, connections: int = 64) -> PlayClient:
    return PlayClient(
        settings.google_service_account_file,
        endpoint=settings.google_api_endpoint,
        timeout_seconds=settings.google_api_timeout_seconds,
        connections=connections,
        outbound=OutboundPolicy.from_settings(settings),
    )


def _google(
    settings: ReceiptsSettings,
    crediting: Crediting,
    catalog: Catalog,
    binding: Binding,
    purchases: PurchaseRepository,
    clock: Clock,
    metrics: Metrics,
) -> GooglePurchases:
    """The Google Play path; consumes are handed to the worker from a background thread."""
    consumptions = ConsumptionRepository(purchases.database)
    metrics.registry.register(
        OverdueCollector(consumptions, clock, timedelta(seconds=settings.google_consume_overdue_seconds))
    )
    sender = google_tasks.celery_sender(settings.broker_url, settings.receipts_queue)
    return GooglePurchases(
        _play_client(settings),
        crediting,
        catalog,
        binding,
        purchases,
        consumptions,
        GooglePolicy(settings.google_package_name),
        google_tasks.BackgroundEnqueuer(sender),
        clock,
        Refusals(metrics, "coinstore_receipts_google_refusals", "Google Play purchases refused, by reason"),
    )


def inbox(settings: ReceiptsSettings, database: Database) -> InboxRepository:
    """The notification inbox with the dead-letter policy of the settings."""
    refunds = RetryPolicy(
        cap=timedelta(seconds=settings.notifications_refund_retry_cap_seconds),
        min_age=timedelta(days=settings.notifications_refund_retry_days),
    )
    return InboxRepository(database, DeadLetterPolicy(refunds=refunds))


# --- the gRPC service and its webhooks ---------------------------------------------------


def build_servicer(components: Components) -> ReceiptServiceServicer:
    return ReceiptServiceServicer(  # type: ignore[abstract]
        purchases=components.purchases,
        bindings=components.bindings,
        binding=components.binding,
        catalog=components.catalog,
        clock=components.clock,
        apple=components.apple,
        google=components.google,
        consents=ConsentRepository(components.database),
    )


def build_host(components: Components, runtime: Runtime, port: int | None = None) -> ServiceHost:
    """The receipts gRPC host over ``components`` (shared with the webhook server)."""
    settings = components.settings
    servicer = build_servicer(components)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_ReceiptServiceServicer_to_server(servicer, server)

    return ServiceHost(
        name=SERVICE,
        files=[pb.DESCRIPTOR],
        register=register,
        database=runtime.database,
        verifier=runtime.verifier,
        metrics=runtime.metrics,
        bind=f"{settings.bind_host}:{settings.receipts_grpc_port if port is None else port}",
        grace_seconds=settings.shutdown_grace_seconds,
        options=ServerOptions.from_settings(settings),
    )


def webhook_deps(
    settings: ReceiptsSettings,
    components: Components,
    dispatch: Callable[[int], None],
    failpoints: Failpoints | None = None,
) -> WebhookDeps:
    """The webhook's pieces, sharing the core's Apple verifier (the one VerifyApplePurchase uses)."""
    return WebhookDeps(
        inbox=inbox(settings, components.database),
        apple_verifier=components.apple.verifier,
        apple=AppleExpectations(settings.apple_bundle_id, settings.apple_app_id),
        pubsub=PubSubTokenVerifier(
            JwksCache(
                settings.pubsub_jwks_url,
                fetch=OutboundPolicy.from_settings(settings).get,
                failure_cooldown=settings.pubsub_jwks_failure_cooldown_seconds,
            ),
            settings.pubsub_audience,
            settings.pubsub_service_account,
        ),
        package_name=settings.google_package_name,
        dispatch=dispatch,
        metrics=components.metrics,
        clock=components.clock,
        failpoints=failpoints or Failpoints(),
        limits=WebhookLimits(
            max_body_bytes=settings.webhook_max_body_bytes,
            max_json_depth=settings.webhook_max_json_depth,
            read_timeout_seconds=settings.webhook_read_timeout_seconds,
            max_concurrent_requests=settings.webhook_max_concurrent_requests,
            apple_max_age=timedelta(hours=settings.apple_notification_max_age_hours),
        ),
    )


def build_webhooks(settings: ReceiptsSettings, components: Components, failpoints: Failpoints) -> WebhookServer:
    """The webhook server; stored notifications are queued to the receipts worker."""
    celery = make_celery_app(settings.receipts_queue, settings.broker_url)
    dispatch = notification_tasks.sender(celery, settings.receipts_queue)
    deps = webhook_deps(settings, components, dispatch, failpoints)
    components.metrics.registry.register(InboxCollector(deps.inbox))
    components.metrics.registry.register(unchecked_age_collector(settings, components.database, components.clock))
    return WebhookServer(create_webhook_app(deps), settings.bind_host, settings.webhook_port)


# --- the worker ----------------------------------------------------------------------------


def notification_handler(settings: ReceiptsSettings, components: Components, loop: OnLoop) -> NotificationHandler:
    """Stored notifications through the core; ``loop`` is the one ``components`` run on."""
    return NotificationHandler(
        components.crediting,
        components.google,
        components.apple.policy,
        components.apple.api,
        components.bindings,
        loop,
        send_consumption=settings.apple_send_consumption,
        consumption=WalletConsumptionFacts(ConsentRepository(components.database), components.wallet, loop),
        metrics=components.metrics,
    )


def promise(settings: ReceiptsSettings) -> Promise:
    return Promise(
        apple_lookback=timedelta(days=settings.reconcile_apple_days),
        google_lookback=timedelta(days=settings.reconcile_google_days),
        overlap=timedelta(hours=settings.reconcile_overlap_hours),
    )


def apple_environments(settings: ReceiptsSettings) -> tuple[Environment, ...]:
    """The App Store environments reconciled: the Sandbox only when someone may buy there."""
    sandbox = (Environment.SANDBOX,) if settings.sandbox_accounts else ()
    return (Environment.PRODUCTION, *sandbox)


def unchecked_age_collector(settings: ReceiptsSettings, database: Database, clock: Clock) -> UncheckedAgeCollector:
    """coinstore_reconcile_unchecked_age_seconds and _promise_seconds, for the receipts metrics port."""
    terms = promise(settings)
    lookbacks = {"google": terms.google_lookback}
    lookbacks.update({f"apple:{e.value}": terms.apple_lookback for e in apple_environments(settings)})
    return UncheckedAgeCollector(
        CursorRepository(database), clock, lookbacks, timedelta(hours=settings.reconcile_promise_hours)
    )


def reconciler(
    settings: ReceiptsSettings,
    components: Components,
    loop: OnLoop,
    metrics: Metrics | None = None,
    processor: InboxProcessor | None = None,
) -> Reconciler:
    """The reconciler; notifications it finds lost go through ``processor`` (the worker's), or one of its own."""
    notifications = inbox(settings, components.database)
    if processor is None:
        handler = notification_handler(settings, components, loop)
        processor = InboxProcessor(notifications, handler, metrics or components.metrics, SystemClock())
    return Reconciler(
        crediting=components.crediting,
        runs=ReconcileRunRepository(components.database),
        cursors=CursorRepository(components.database),
        inbox=notifications,
        processor=processor,
        play=components.google.client,
        apple_api=components.apple.api,
        apple_verifier=components.apple.verifier,
        apple_expectations=AppleExpectations(settings.apple_bundle_id, settings.apple_app_id),
        apple_environments=apple_environments(settings),
        loop=loop,
        metrics=metrics or components.metrics,
        clock=SystemClock(),
        package_name=settings.google_package_name,
        promise=promise(settings),
    )


def build_notification_worker(settings: ReceiptsSettings) -> NotificationWorker:
    """What a worker process (or the reconcile command) needs to process notifications: the
    core on an event loop thread of its own, the inbox and the reconciler."""
    runtime = build_runtime(SERVICE, settings)
    loop = LoopThread("receipts-core-loop")

    async def build() -> Components:
        return build_components(settings, runtime)

    components = loop.run(build())
    notifications = inbox(settings, runtime.database)
    handler = notification_handler(settings, components, loop)
    processor = InboxProcessor(notifications, handler, components.metrics, SystemClock(), runtime.failpoints)
    return NotificationWorker(
        inbox=notifications,
        processor=processor,
        reconciler=reconciler(settings, components, loop, processor=processor),
    )


def credited_play(wallet: WalletClient, loop: OnLoop) -> CreditedPlay:
    """The Play purchases the wallet credited in [since, before), read on ``loop`` (the wallet client's)."""

    def listed(since: datetime, before: datetime) -> list[CreditedPlayPurchase]:
        purchases = loop.run(wallet.credited_purchases(StoreId.GOOGLE_PLAY, since, before))
        return [
            CreditedPlayPurchase(p.store_transaction_id, p.product_id, p.credit_time.ToDatetime(tzinfo=UTC))
            for p in purchases
        ]

    return listed


def build_credited_play(settings: ReceiptsSettings) -> CreditedPlay:
    """The sweep's wallet reader in a worker process: a wallet client on a loop thread of its own
    (nothing else: the consumption sweep must not depend on the App Store's settings)."""
    loop = LoopThread("receipts-sweep-wallet")
    source = token_source(settings, SERVICE, WALLET_SCOPES)

    async def client() -> WalletClient:
        return WalletClient(aio_channel(settings.wallet_address, source), settings.wallet_call_timeout_seconds)

    return credited_play(loop.run(client()), loop)


def build_consumer(settings: ReceiptsSettings) -> Consumer:
    """The Play consumer of a worker process: its own small pool and client (no wallet, no loop)."""
    database = Database.from_url(settings.database_url, 2)
    return Consumer(_play_client(settings, connections=2), ConsumptionRepository(database), SystemClock())


def build_credit_sweeper(settings: ReceiptsSettings) -> CreditSweeper:
    """The outbox sweep of a worker process: the core on an event loop thread of its own."""
    runtime = build_runtime(SERVICE, settings)
    loop = LoopThread("receipts-credit-loop")

    async def build() -> Components:
        return build_components(settings, runtime)

    components = loop.run(build())
    return CreditSweeper(components.crediting, loop, timedelta(seconds=settings.credit_sweep_grace_seconds))


def register_tasks(app: Celery, settings: ReceiptsSettings) -> None:
    """Every slice's Celery tasks and beat entries, on the receipts worker's app."""
    purchase_tasks.register(app, settings, lambda: build_credit_sweeper(settings), settings.receipts_queue)
    google_tasks.register(app, settings, lambda: build_consumer(settings), lambda: build_credited_play(settings))
    notification_tasks.register(app, settings, lambda: build_notification_worker(settings), settings.receipts_queue)
