"""Settings of the payouts service (environment variables are read here and in
services.common.settings only)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from services.common.settings import PREFIX, CommonSettings, SettingsError, setting


class ProviderKind(enum.Enum):
    PAYPAL = "paypal"


@dataclass(frozen=True, kw_only=True, repr=False)
class PayoutsSettings(CommonSettings):
    """Everything the payouts service reads from the environment."""

    SERVICE: ClassVar[str] = "payouts"

    payout_provider: ProviderKind = setting(
        "PAYOUT_PROVIDER", "Payout provider adapter (paypal; the simulator speaks PayPal's API)", ProviderKind.PAYPAL
    )
    paypal_api_url: str = setting(
        "PAYPAL_API_URL",
        "PayPal REST API base URL (production: https://api-m.paypal.com)",
        "http://127.0.0.1:8090/paypal",
    )
    paypal_client_id: str = setting("PAYPAL_CLIENT_ID", "PayPal REST app client id", "coinstore-dev")
    paypal_client_secret: str = setting(
        "PAYPAL_CLIENT_SECRET", "PayPal REST app client secret", "coinstore-dev-secret", secret=True
    )
    paypal_timeout_seconds: float = setting(
        "PAYPAL_TIMEOUT_SECONDS", "Timeout of each PayPal API call", 15.0, parse=float
    )
    payout_chunk_size: int = setting("PAYOUT_CHUNK_SIZE", "Items per provider submission (PayPal allows 15,000)", 1000)
    payout_daily_batch_hour: int = setting(
        "PAYOUT_DAILY_BATCH_HOUR", "UTC hour Celery beat creates the daily payout batch (-1 = off)", 2
    )
    payout_poll_seconds: float = setting(
        "PAYOUT_POLL_SECONDS", "Seconds between polls of a submitted payout for item results", 5.0, parse=float
    )
    payout_stuck_seconds: float = setting(
        "PAYOUT_STUCK_SECONDS",
        "Payout work untouched this long is re-queued by the sweeper (lost messages, killed workers)",
        300.0,
        parse=float,
    )
    payout_sweep_seconds: float = setting(
        "PAYOUT_SWEEP_SECONDS", "How often Celery beat runs the payout sweeper", 60.0, parse=float
    )
    payout_reservation_days: int = setting(
        "PAYOUT_RESERVATION_DAYS", "Days the wallet holds a cash-out's diamonds before the hold lapses", 30
    )
    payout_settle_concurrency: int = setting(
        "PAYOUT_SETTLE_CONCURRENCY", "Parallel wallet calls per worker process when settling paid/failed items", 8
    )
    payout_hold_margin_seconds: float = setting(
        "PAYOUT_HOLD_MARGIN_SECONDS",
        "A cash-out not yet submitted whose wallet hold lapses within this many seconds is expired by the sweeper"
        " (never paid; diamonds released)",
        36 * 3600.0,
        parse=float,
    )
    payout_park_after: int = setting(
        "PAYOUT_PARK_AFTER",
        "Ambiguous provider answers to one submission (a refused re-submission, a duplicate without a link)"
        " before it is parked for ops review",
        5,
    )
    payout_queue: str = setting("PAYOUT_QUEUE", "Celery queue the payout tasks run on", "payouts")

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        url = self.url_problem("PAYPAL_API_URL", self.paypal_api_url)
        if url:
            problems.append(url)
        for name in ("paypal_client_id", "paypal_client_secret"):
            if self.at_default(name):
                problems.append(f"{PREFIX}{name.upper()} is the development credential")
        return problems

    def validate(self) -> None:
        super().validate()
        problems = []
        if not 1 <= self.payout_chunk_size <= 15_000:
            problems.append("COINSTORE_PAYOUT_CHUNK_SIZE must be between 1 and 15000 (PayPal's limit per call)")
        if not -1 <= self.payout_daily_batch_hour <= 23:
            problems.append("COINSTORE_PAYOUT_DAILY_BATCH_HOUR must be -1 (off) or an hour 0-23")
        if self.paypal_timeout_seconds <= 0:
            problems.append("COINSTORE_PAYPAL_TIMEOUT_SECONDS must be positive")
        if self.payout_poll_seconds <= 0 or self.payout_sweep_seconds <= 0 or self.payout_stuck_seconds <= 0:
            problems.append("COINSTORE_PAYOUT_POLL/SWEEP/STUCK_SECONDS must be positive")
        if self.payout_reservation_days < 1:
            problems.append("COINSTORE_PAYOUT_RESERVATION_DAYS must be at least 1")
        if self.payout_hold_margin_seconds < 0 or self.payout_park_after < 1:
            problems.append(
                "COINSTORE_PAYOUT_HOLD_MARGIN_SECONDS must not be negative and COINSTORE_PAYOUT_PARK_AFTER at least 1"
            )
        if self.payout_hold_margin_seconds >= self.payout_reservation_days * 86400:
            problems.append("COINSTORE_PAYOUT_HOLD_MARGIN_SECONDS must be shorter than the hold itself")
        if self.payout_settle_concurrency < 1:
            problems.append("COINSTORE_PAYOUT_SETTLE_CONCURRENCY must be at least 1")
        if problems:
            raise SettingsError("invalid configuration: " + "; ".join(problems))
