"""Settings of the wallet service (environment variables are read here and in
services.common.settings only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from services.common.settings import CommonSettings, SettingsError, setting


@dataclass(frozen=True, kw_only=True, repr=False)
class WalletSettings(CommonSettings):
    """Everything the wallet service reads from the environment."""

    SERVICE: ClassVar[str] = "wallet"
    USES_BROKER: ClassVar[bool] = False
    CALLS_SERVICES: ClassVar[bool] = False  # it only answers: no signing key to judge

    wallet_reservation_ttl_days: int = setting(
        "WALLET_RESERVATION_TTL_DAYS",
        "Days a diamond reservation is held when the caller gives no expire_time; then the diamonds return",
        30,
    )
    wallet_group_commit_window_ms: float = setting(
        "WALLET_GROUP_COMMIT_WINDOW_MS",
        "Group commit: milliseconds gifts and credits wait to share one database transaction"
        " (0 = one transaction per request)",
        1.0,
        parse=float,
    )
    wallet_group_commit_max: int = setting(
        "WALLET_GROUP_COMMIT_MAX", "Group commit: most requests in one database transaction", 256
    )

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.wallet_reservation_ttl_days < 1:
            problems.append("COINSTORE_WALLET_RESERVATION_TTL_DAYS must be at least 1")
        if not 0 <= self.wallet_group_commit_window_ms <= 1000:
            problems.append("COINSTORE_WALLET_GROUP_COMMIT_WINDOW_MS must be between 0 and 1000")
        if self.wallet_group_commit_max < 1:
            problems.append("COINSTORE_WALLET_GROUP_COMMIT_MAX must be at least 1")
        if problems:
            raise SettingsError("invalid configuration: " + "; ".join(problems))
