"""Builds the Google Play path from the settings (called by ``build_components``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.catalog import Catalog
from services.common.celery_app import make_celery_app
from services.common.clock import Clock
from services.common.metrics import Metrics
from services.receipts.config import ReceiptsSettings
from services.receipts.crediting import Crediting
from services.receipts.domain.binding import Binding
from services.receipts.domain.google import GooglePolicy
from services.receipts.google.client import PlayClient
from services.receipts.google.service import GooglePurchases
from services.receipts.google.store import ConsumptionStore
from services.receipts.store import PurchaseStore
from services.receipts.tasks_google import CONSUME_TASK, QUEUE


class OverdueCollector(Collector):
    """``coinstore_receipts_google_unconsumed_overdue_now``: credited Play purchases
    not consumed after the overdue age, counted from the database at scrape time."""

    def __init__(self, store: ConsumptionStore, clock: Clock, overdue: timedelta) -> None:
        self._store = store
        self._clock = clock
        self._overdue = overdue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "coinstore_receipts_google_unconsumed_overdue_now",
            "Credited Google Play purchases still unconsumed after COINSTORE_GOOGLE_CONSUME_OVERDUE_SECONDS",
        )
        try:
            gauge.add_metric([], float(self._store.count_overdue(self._clock.now(), self._overdue)))
        except Exception:  # the database is down: report nothing rather than fail the scrape
            return
        yield gauge


def celery_enqueuer(broker_url: str) -> Callable[[str], None]:
    """Send the consume task to the receipts worker (a blocking call; run it off the loop)."""
    app = make_celery_app(QUEUE, broker_url)

    def enqueue(token: str) -> None:
        app.send_task(CONSUME_TASK, args=[token], queue=QUEUE)

    return enqueue


def build_google(
    settings: ReceiptsSettings,
    crediting: Crediting,
    catalog: Catalog,
    binding: Binding,
    store: PurchaseStore,
    clock: Clock,
    metrics: Metrics,
    enqueue: Callable[[str], None] | None = None,
) -> GooglePurchases:
    client = PlayClient(
        settings.google_service_account_file,
        endpoint=settings.google_api_endpoint,
        timeout_seconds=settings.google_api_timeout_seconds,
    )
    consumptions = ConsumptionStore(store.database)
    metrics.registry.register(
        OverdueCollector(consumptions, clock, timedelta(seconds=settings.google_consume_overdue_seconds))
    )
    return GooglePurchases(
        client,
        crediting,
        catalog,
        binding,
        store,
        consumptions,
        GooglePolicy(settings.google_package_name, settings.google_allow_test_purchases),
        enqueue or celery_enqueuer(settings.broker_url),
        clock,
        metrics,
    )
