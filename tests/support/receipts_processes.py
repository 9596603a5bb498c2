"""The receipts service and its worker as real processes, for crash tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.ports import free_port
from tests.support.tokens import Keys

REPO = Path(__file__).resolve().parents[2]
WORKER = ["-m", "services.receipts.worker", "--beat", "--pool", "solo", "--concurrency", "1"]
SERVICE = ["-m", "services.receipts"]


def receipts_env(database_url: str, keys: Keys, state_dir: Path, wallet_port: int, **settings: str) -> dict[str, str]:
    """The environment of a receipts process (service or worker) on free ports.

    ``state_dir`` holds the App Store simulator's root and key
    (``services.storesim.apple.create_store``); ``settings`` are more
    COINSTORE_* values, named without the prefix."""
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'gen'}",
        "COINSTORE_DATABASE_URL": database_url,
        "COINSTORE_WEBHOOK_PORT": str(free_port()),
        "COINSTORE_RECEIPTS_GRPC_PORT": str(free_port()),
        "COINSTORE_RECEIPTS_METRICS_PORT": str(free_port()),
        "COINSTORE_WALLET_ADDRESS": f"127.0.0.1:{wallet_port}",
        "COINSTORE_AUTH_SIGNING_KEY": str(keys.private_path),
        "COINSTORE_AUTH_TRUSTED_KEYS": str(keys.public_path),
        "COINSTORE_CATALOG": str(REPO / "deploy" / "catalog.toml"),
        "COINSTORE_APPLE_ROOT_CERTS": str(state_dir / "apple" / "root.der"),
        "COINSTORE_APPLE_API_KEY_FILE": str(state_dir / "apple" / "SubscriptionKey.p8"),
        "COINSTORE_LOG_FORMAT": "text",
        **{f"COINSTORE_{name.upper()}": value for name, value in settings.items()},
    }


@contextmanager
def child(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python <args>`` with its output appended to ``log``; SIGTERM (then SIGKILL) on the way out."""
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, *args], env=env, cwd=cwd, stdout=out, stderr=out)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
