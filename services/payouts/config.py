"""Settings of the payouts service (environment variables are read here and in
services.common.settings only)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.settings import CommonSettings, setting


class ProviderKind(enum.Enum):
    PAYPAL = "paypal"


@dataclass(frozen=True, kw_only=True)
class PayoutsSettings(CommonSettings):
    """Everything the payouts service reads from the environment."""

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
