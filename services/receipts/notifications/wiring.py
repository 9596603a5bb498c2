"""Builds the notification pieces from settings: the one place that chooses
adapters (the core's where they exist, `shims` otherwise)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from services.common.bootstrap import build_runtime
from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.failpoints import Failpoints
from services.common.metrics import Metrics
from services.receipts.components import SERVICE, Components
from services.receipts.components import build_components as core_components
from services.receipts.config import ReceiptsSettings
from services.receipts.notifications.core import CoreActions, CoreAppleApi, CoreAppleVerifier, CorePlayApi, LoopThread
from services.receipts.notifications.parse import AppleExpectations
from services.receipts.notifications.ports import AppleJwsVerifier, AppleServerApi, PlayApi, PurchaseActions
from services.receipts.notifications.processor import DeliveredFacts, Handlers, InboxProcessor, NotificationHandler
from services.receipts.notifications.pubsub_auth import JwksCache, PubSubTokenVerifier
from services.receipts.notifications.repository import BindingStore, InboxStore
from services.receipts.notifications.webhooks import WebhookDeps


def apple_expectations(settings: ReceiptsSettings) -> AppleExpectations:
    return AppleExpectations(settings.apple_bundle_id, settings.apple_app_id)


def pubsub_verifier(settings: ReceiptsSettings) -> PubSubTokenVerifier:
    return PubSubTokenVerifier(
        JwksCache(settings.pubsub_jwks_url), settings.pubsub_audience, settings.pubsub_service_account
    )


def webhook_deps(
    settings: ReceiptsSettings,
    core: Components,
    dispatch: Callable[[int], None],
    loop: asyncio.AbstractEventLoop,
    failpoints: Failpoints | None = None,
) -> WebhookDeps:
    """The webhook's pieces, sharing the core's Apple verifier; call inside the serving loop."""
    return WebhookDeps(
        inbox=InboxStore(core.database),
        apple_verifier=CoreAppleVerifier(core.apple.verifier, loop),
        apple=apple_expectations(settings),
        pubsub=pubsub_verifier(settings),
        package_name=settings.google_package_name,
        dispatch=dispatch,
        metrics=core.metrics,
        clock=core.clock,
        failpoints=failpoints or Failpoints(),
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
    apple_verifier: AppleJwsVerifier | None = None


def build_components(
    settings: ReceiptsSettings,
    database: Database,
    metrics: Metrics,
    actions: PurchaseActions,
    *,
    apple: AppleServerApi | None = None,
    play: PlayApi | None = None,
    clock: Clock | None = None,
    failpoints: Failpoints | None = None,
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
        processor=InboxProcessor(inbox, handler, metrics, clock, failpoints),
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
    components = build_components(
        settings,
        runtime.database,
        runtime.metrics,
        CoreActions(parts.crediting, parts.store, loop.loop, parts.apple.policy, parts.google),
        apple=CoreAppleApi(parts.apple.api, loop.loop),
        play=CorePlayApi(parts.google.client),
        failpoints=runtime.failpoints,
    )
    components.apple_verifier = CoreAppleVerifier(parts.apple.verifier, loop.loop)
    return components
