"""Settings of the store simulator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.settings import LogFormat, setting


@dataclass(frozen=True, kw_only=True)
class StoresimSettings:
    host: str = setting("STORESIM_HOST", "Address the store simulator listens on", "127.0.0.1")
    port: int = setting("STORESIM_PORT", "Store simulator HTTP port", 8090)
    state_dir: Path = setting(
        "STORESIM_STATE_DIR", "Where the simulator keeps its keys, certificates and state", Path("var/storesim")
    )
    log_level: str = setting("LOG_LEVEL", "Log level (DEBUG, INFO, WARNING, ERROR)", "INFO")
    log_format: LogFormat = setting("LOG_FORMAT", "json or text", LogFormat.JSON)
