"""Settings of the payouts service (environment variables are read here and in
services.common.settings only)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import CommonSettings


@dataclass(frozen=True, kw_only=True)
class PayoutsSettings(CommonSettings):
    """Everything the payouts service reads from the environment."""
