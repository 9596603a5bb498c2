"""Settings of the store simulator."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from services.common.settings import LogFormat, SettingsError, setting


@dataclass(frozen=True, kw_only=True)
class StoresimSettings:
    host: str = setting("STORESIM_HOST", "Address the store simulator listens on", "127.0.0.1")
    port: int = setting("STORESIM_PORT", "Store simulator HTTP port", 8090)
    state_dir: Path = setting(
        "STORESIM_STATE_DIR", "Where the simulator keeps its keys, certificates and state", Path("var/storesim")
    )
    tls_cert_file: Path | None = setting(
        "STORESIM_TLS_CERT_FILE",
        "Serve https with this certificate chain (PEM), e.g. from a test CA, so production mode can be tried here",
        None,
    )
    tls_key_file: Path | None = setting("STORESIM_TLS_KEY_FILE", "The private key (PEM) of the https certificate", None)
    log_level: str = setting("LOG_LEVEL", "Log level (DEBUG, INFO, WARNING, ERROR)", "INFO")
    log_format: LogFormat = setting("LOG_FORMAT", "json or text", LogFormat.JSON)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert_file else "http"

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_cert_file is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return context

    def validate(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise SettingsError(
                "invalid configuration: COINSTORE_STORESIM_TLS_CERT_FILE and"
                " COINSTORE_STORESIM_TLS_KEY_FILE go together"
            )
