"""Builds the payouts domain from settings: provider adapter chosen by configuration, wallet client, queue."""

from __future__ import annotations

from celery import Celery

from services.common.bootstrap import token_source
from services.common.catalog import Catalog
from services.common.celery_app import MAX_COUNTDOWN_SECONDS
from services.common.clock import Clock
from services.common.db import Database
from services.common.failpoints import Failpoints
from services.common.outbound import OutboundPolicy
from services.payouts.config import PayoutsSettings, ProviderKind
from services.payouts.domain.pipeline import Pipeline
from services.payouts.domain.ports import PayoutProvider, WalletPort
from services.payouts.domain.rules import Rules
from services.payouts.domain.service import Payouts
from services.payouts.paypal import PayPalProvider
from services.payouts.store import PayoutStore
from services.payouts.wallet_client import GrpcWallet

WALLET_SCOPES = ("wallet:reserve", "wallet:read")


class CeleryQueue:
    """The task queue port over a Celery app (tasks are sent by name: no import of the task bodies)."""

    def __init__(self, app: Celery, queue: str) -> None:
        self._app = app
        self._queue = queue

    def enqueue(self, task: str, *args: str, countdown: float | None = None) -> None:
        delay = None if countdown is None else min(countdown, MAX_COUNTDOWN_SECONDS)
        self._app.send_task(task, args=list(args), countdown=delay, queue=self._queue)


def build_provider(settings: PayoutsSettings) -> PayoutProvider:
    if settings.payout_provider is ProviderKind.PAYPAL:
        return PayPalProvider(
            settings.paypal_api_url,
            settings.paypal_client_id,
            settings.paypal_client_secret,
            settings.paypal_timeout_seconds,
            outbound=OutboundPolicy.from_settings(settings),
        )
    raise ValueError(f"no adapter for payout provider {settings.payout_provider}")


def build_wallet(settings: PayoutsSettings) -> GrpcWallet:
    tokens = token_source(settings, "payouts", WALLET_SCOPES)
    return GrpcWallet(settings.wallet_address, tokens, settings.wallet_call_timeout_seconds)


def build_domain(
    settings: PayoutsSettings,
    database: Database,
    catalog: Catalog,
    queue: CeleryQueue,
    clock: Clock,
    *,
    provider: PayoutProvider | None = None,
    wallet: WalletPort | None = None,
    failpoints: Failpoints | None = None,
) -> tuple[Payouts, Pipeline]:
    store = PayoutStore(database)
    rules = Rules(catalog.payouts)
    wallet_port = wallet if wallet is not None else build_wallet(settings)
    pipeline = Pipeline(
        store,
        provider if provider is not None else build_provider(settings),
        wallet_port,
        queue,
        clock,
        chunk_size=settings.payout_chunk_size,
        poll_seconds=settings.payout_poll_seconds,
        stuck_seconds=settings.payout_stuck_seconds,
        settle_concurrency=settings.payout_settle_concurrency,
        max_countdown=MAX_COUNTDOWN_SECONDS,
        minimum_diamonds=rules.minimum_diamonds,
        hold_margin_seconds=settings.payout_hold_margin_seconds,
        park_after=settings.payout_park_after,
        failpoints=failpoints,
    )
    payouts = Payouts(
        store, wallet_port, rules, clock, queue, pipeline, settings.payout_reservation_days, failpoints=failpoints
    )
    return payouts, pipeline
