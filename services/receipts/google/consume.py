"""Consume a credited Play purchase (``purchases.products.consume``, which also
acknowledges): the decisions, without Celery.

A row in ``receipts_google_consumptions`` exists only once the credit
committed. 409 ``concurrentUpdate`` and an unavailable or refusing Google are
retried; 400 ``invalidPurchaseState`` re-reads the purchase: already consumed
is success, refunded or cancelled is abandoned (nothing left to consume).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.clock import Clock
from services.common.errors import Unavailable
from services.receipts.google.client import PlayApiError, PlayClient
from services.receipts.google.repository import ConsumeState, ConsumptionRepository
from services.receipts.google.rules import CANCELLED, PURCHASED

log = logging.getLogger(__name__)


@dataclass
class ConsumeOutcome:
    """What one consume attempt decided: done (with the final state) or retry."""

    done: bool
    state: ConsumeState | None = None
    note: str = ""


class Consumer:
    """Consumes one credited Play purchase; the decisions, without Celery."""

    def __init__(self, client: PlayClient, consumptions: ConsumptionRepository, clock: Clock) -> None:
        self.client = client
        self.consumptions = consumptions
        self.clock = clock

    def consume(self, token: str) -> ConsumeOutcome:
        row = self.consumptions.get(token)
        if row is None or row.state is not ConsumeState.UNCONSUMED:
            return ConsumeOutcome(True, row.state if row else None, "nothing to do")
        try:
            self.client.consume(row.package_name, row.product_id, token)
            return self._finish(token, ConsumeState.CONSUMED, "")
        except PlayApiError as error:
            if error.status == 409:
                return self._retry(token, f"409 {error.reason}")
            if error.status == 400 and error.reason == "invalidPurchaseState":
                return self._reread(token, row.product_id, row.package_name)
            if error.status in (404, 410):
                return self._finish(token, ConsumeState.ABANDONED, f"{error.status} {error.reason}")
            return self._retry(token, str(error))
        except Unavailable as error:
            return self._retry(token, f"{error.reason}: {error.message}")

    def _reread(self, token: str, product_id: str, package_name: str) -> ConsumeOutcome:
        try:
            purchase = self.client.get_purchase_v2(package_name, token)
        except PlayApiError as error:
            if error.status in (404, 410):
                return self._finish(token, ConsumeState.ABANDONED, f"{error.status} {error.reason}")
            return self._retry(token, str(error))
        except Unavailable as error:
            return self._retry(token, f"{error.reason}: {error.message}")
        items = [i for i in purchase.line_items if i.product_id == product_id]
        if items and items[0].consumed:
            return self._finish(token, ConsumeState.CONSUMED, "already consumed")
        if purchase.purchase_state == CANCELLED or (items and items[0].refundable_quantity == 0):
            return self._finish(token, ConsumeState.ABANDONED, "refunded or cancelled at Google")
        if purchase.purchase_state != PURCHASED:
            return self._finish(token, ConsumeState.ABANDONED, f"state {purchase.purchase_state}")
        return self._retry(token, "400 invalidPurchaseState while PURCHASED and unconsumed")

    def _finish(self, token: str, state: ConsumeState, note: str) -> ConsumeOutcome:
        if self.consumptions.finish(token, state, self.clock.now(), note):
            log.info("Play purchase %s…: %s %s", token[:12], state.value, note)
        return ConsumeOutcome(True, state, note)

    def _retry(self, token: str, why: str) -> ConsumeOutcome:
        self.consumptions.attempt(token, why, self.clock.now())
        return ConsumeOutcome(False, None, why)


class OverdueCollector(Collector):
    """``coinstore_receipts_google_unconsumed_overdue_now``: credited Play purchases
    not consumed after the overdue age, counted from the database at scrape time."""

    def __init__(self, consumptions: ConsumptionRepository, clock: Clock, overdue: timedelta) -> None:
        self._consumptions = consumptions
        self._clock = clock
        self._overdue = overdue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "coinstore_receipts_google_unconsumed_overdue_now",
            "Credited Google Play purchases still unconsumed after COINSTORE_GOOGLE_CONSUME_OVERDUE_SECONDS",
        )
        try:
            gauge.add_metric([], float(self._consumptions.count_overdue(self._clock.now(), self._overdue)))
        except Exception:  # the database is down: report nothing rather than fail the scrape
            return
        yield gauge
