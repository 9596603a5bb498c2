"""Settings of the wallet service (environment variables are read here and in
services.common.settings only)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import CommonSettings, SettingsError, setting


@dataclass(frozen=True, kw_only=True)
class WalletSettings(CommonSettings):
    """Everything the wallet service reads from the environment."""

    wallet_reservation_ttl_days: int = setting(
        "WALLET_RESERVATION_TTL_DAYS",
        "Days a diamond reservation is held when the caller gives no expire_time; then the diamonds return",
        30,
    )
    wallet_gift_batch_window_ms: float = setting(
        "WALLET_GIFT_BATCH_WINDOW_MS",
        "Group commit: milliseconds gifts wait to share one database transaction (0 = one transaction per gift)",
        1.0,
        parse=float,
    )
    wallet_gift_batch_max: int = setting(
        "WALLET_GIFT_BATCH_MAX", "Group commit: most gifts in one database transaction", 256
    )

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.wallet_reservation_ttl_days < 1:
            problems.append("COINSTORE_WALLET_RESERVATION_TTL_DAYS must be at least 1")
        if not 0 <= self.wallet_gift_batch_window_ms <= 1000:
            problems.append("COINSTORE_WALLET_GIFT_BATCH_WINDOW_MS must be between 0 and 1000")
        if self.wallet_gift_batch_max < 1:
            problems.append("COINSTORE_WALLET_GIFT_BATCH_MAX must be at least 1")
        if problems:
            raise SettingsError("invalid configuration: " + "; ".join(problems))
