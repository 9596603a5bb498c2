"""Builds the Google Play path from the settings (called by ``build_components``)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.catalog import Catalog
from services.common.celery_app import make_celery_app
from services.common.clock import Clock
from services.common.metrics import Metrics
from services.receipts.config import ReceiptsSettings
from services.receipts.google.client import PlayClient
from services.receipts.google.repository import ConsumptionStore
from services.receipts.google.rules import GooglePolicy
from services.receipts.google.tasks import CONSUME_BATCH_TASK, CONSUME_TASK
from services.receipts.google.verify import GooglePurchases
from services.receipts.purchases.binding import Binding
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.repository import PurchaseStore

log = logging.getLogger(__name__)


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


class BackgroundEnqueuer:
    """Hands consume tasks to the broker from one background thread.

    The RPC only puts the token on a bounded in-memory queue: a slow broker
    (the embedded SQLite one takes tens of milliseconds per message) never adds
    to a verification's latency. The durable record is the database row, so a
    token dropped here (queue full, broker down, process killed) is consumed by
    the sweep instead.
    """

    def __init__(self, send: Callable[[list[str]], None], capacity: int = 10_000, batch: int = 100) -> None:
        self._send = send
        self._batch = batch
        self._queue: queue.Queue[str | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="play-consume-enqueuer", daemon=True)
        self._thread.start()

    def __call__(self, token: str) -> None:
        try:
            self._queue.put_nowait(token)
        except queue.Full:
            log.warning("the consume queue is full; the sweep will consume this Play purchase")

    def _run(self) -> None:
        stopping = False
        while not stopping:
            tokens: list[str] = []
            item = self._queue.get()
            while item is not None:
                tokens.append(item)
                if len(tokens) >= self._batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            stopping = item is None
            if not tokens:
                continue
            try:
                self._send(tokens)
            except Exception as exc:
                log.warning("could not queue %d Play consume(s) (the sweep will retry): %s", len(tokens), exc)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to ``timeout``), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


def celery_sender(broker_url: str, queue: str) -> Callable[[list[str]], None]:
    """Send consume work to the receipts worker, one message per batch (blocking)."""
    app = make_celery_app(queue, broker_url)

    def send(tokens: list[str]) -> None:
        if len(tokens) == 1:
            app.send_task(CONSUME_TASK, args=[tokens[0]], queue=queue)
        else:
            app.send_task(CONSUME_BATCH_TASK, args=[tokens], queue=queue)

    return send


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
        GooglePolicy(settings.google_package_name),
        enqueue or BackgroundEnqueuer(celery_sender(settings.broker_url, settings.receipts_queue)),
        clock,
        metrics,
    )
