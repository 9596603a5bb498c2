"""Celery tasks of the Google Play path: consume after credit, the unconsumed sweep."""

from __future__ import annotations

from celery import Celery

from services.receipts.config import ReceiptsSettings


def register(app: Celery, settings: ReceiptsSettings) -> None:
    """Register this module's tasks and beat entries on the receipts Celery app."""
