"""Builds the notification pieces from settings: the one place that chooses
adapters (the core's where they exist, `shims` otherwise)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.common.bootstrap import build_runtime
from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.metrics import Metrics
from services.receipts.components import SERVICE, Components
from services.receipts.components import build_components as core_components
from services.receipts.config import ReceiptsSettings
from services.receipts.notifications.core import CoreActions, LoopThread
from services.receipts.notifications.oidc import JwksCache, PubSubTokenVerifier
from services.receipts.notifications.parse import AppleExpectations
from services.receipts.notifications.ports import AppleJwsVerifier, AppleServerApi, PlayApi, PurchaseActions
from services.receipts.notifications.processor import Handlers, InboxProcessor, NotificationHandler
from services.receipts.notifications.shims import (
    AppStoreServerApi,
    DeliveredFacts,
    X5cJwsVerifier,
    load_roots,
)
from services.receipts.notifications.store import BindingStore, InboxStore
from services.receipts.webhooks import WebhookDeps


def apple_expectations(settings: ReceiptsSettings) -> AppleExpectations:
    return AppleExpectations(settings.apple_bundle_id, settings.apple_app_id, settings.apple_environments)


def apple_verifier(settings: ReceiptsSettings) -> AppleJwsVerifier:
    return X5cJwsVerifier(load_roots(settings.apple_root_certs))


def pubsub_verifier(settings: ReceiptsSettings) -> PubSubTokenVerifier:
    return PubSubTokenVerifier(
        JwksCache(settings.pubsub_jwks_url), settings.pubsub_audience, settings.pubsub_service_account
    )


def webhook_deps(
    settings: ReceiptsSettings,
    database: Database,
    metrics: Metrics,
    dispatch: Callable[[int], None],
    clock: Clock | None = None,
) -> WebhookDeps:
    return WebhookDeps(
        inbox=InboxStore(database),
        apple_verifier=apple_verifier(settings),
        apple=apple_expectations(settings),
        pubsub=pubsub_verifier(settings),
        package_name=settings.google_package_name,
        dispatch=dispatch,
        metrics=metrics,
        clock=clock or SystemClock(),
    )


def apple_api(settings: ReceiptsSettings) -> AppleServerApi | None:
    if not settings.apple_api_key_file.exists():
        return None
    return AppStoreServerApi(
        production_url=settings.apple_api_url,
        sandbox_url=settings.apple_sandbox_api_url,
        key_file=settings.apple_api_key_file,
        key_id=settings.apple_api_key_id,
        issuer_id=settings.apple_api_issuer_id,
        bundle_id=settings.apple_bundle_id,
        timeout=settings.apple_api_timeout_seconds,
    )


@dataclass
class NotificationComponents:
    inbox: InboxStore
    bindings: BindingStore
    processor: InboxProcessor
    actions: PurchaseActions
    apple_api: AppleServerApi | None
    play: PlayApi | None
    metrics: Metrics


def build_components(
    settings: ReceiptsSettings,
    database: Database,
    metrics: Metrics,
    actions: PurchaseActions,
    *,
    apple: AppleServerApi | None = None,
    play: PlayApi | None = None,
    clock: Clock | None = None,
) -> NotificationComponents:
    clock = clock or SystemClock()
    inbox = InboxStore(database)
    bindings = BindingStore(database)
    handler = NotificationHandler(
        Handlers(
            actions=actions,
            accounts=bindings,
            apple_api=apple,
            play=play,
            package_name=settings.google_package_name,
            send_consumption=settings.apple_send_consumption,
            consumption=DeliveredFacts(),
        )
    )
    return NotificationComponents(
        inbox=inbox,
        bindings=bindings,
        processor=InboxProcessor(inbox, handler, metrics, clock),
        actions=actions,
        apple_api=apple,
        play=play,
        metrics=metrics,
    )


def build_worker_components(settings: ReceiptsSettings) -> NotificationComponents:
    """What a receipts worker process needs: the core's crediting path (on its own
    event loop thread), the store API clients and the inbox."""
    runtime = build_runtime(SERVICE, settings)
    loop = LoopThread()

    async def core() -> Components:
        return core_components(settings, runtime)

    parts = loop.run(core())
    return build_components(
        settings,
        runtime.database,
        runtime.metrics,
        CoreActions(parts.crediting, loop),
        apple=apple_api(settings),
    )
