"""A real service process: SERVING once migrated, and SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.dev import dev_defaults
from services.common import migrate
from services.storesim.app import create_app
from services.storesim.config import StoresimSettings
from tests.support.tokens import Keys

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("service", ["wallet", "receipts", "payouts"])
def test_sigterm_goes_not_serving_and_exits_cleanly(
    service: str, sqlite_url: str, keys: Keys, free_port: int, tmp_path: Path
) -> None:
    migrate.upgrade(service, sqlite_url)
    # The simulator writes the store keys and roots the receipts service loads at start-up.
    create_app(StoresimSettings(state_dir=tmp_path / "storesim"))
    upper = service.upper()
    env = {
        **os.environ,
        **dev_defaults("http://127.0.0.1:1", str(tmp_path / "storesim")),
        "COINSTORE_DATABASE_URL": sqlite_url,
        "COINSTORE_AUTH_TRUSTED_KEYS": str(keys.public_path),
        "COINSTORE_AUTH_SIGNING_KEY": str(keys.private_path),
        f"COINSTORE_{upper}_GRPC_PORT": str(free_port),
        f"COINSTORE_{upper}_METRICS_PORT": "0",
        "COINSTORE_WEBHOOK_PORT": "0",
        "COINSTORE_CATALOG": str(REPO_ROOT / "deploy" / "catalog.toml"),
        "COINSTORE_SHUTDOWN_GRACE_SECONDS": "2",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", f"services.{service}"],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and status != health_pb2.HealthCheckResponse.SERVING:
            assert process.poll() is None
            with grpc.insecure_channel(f"127.0.0.1:{free_port}") as channel:
                try:
                    status = (
                        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    )
                except grpc.RpcError:
                    time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "draining" in output
