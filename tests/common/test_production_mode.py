"""COINSTORE_ENVIRONMENT=production: a real service process refuses to start with unsafe
settings, naming each one, and starts with safe ones."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import migrate
from services.common.settings import CommonSettings, DeployEnvironment
from tests.support.ports import free_port
from tests.support.tokens import make_keys
from tests.wallet.support import write_catalog

REPO = Path(__file__).resolve().parents[2]


def wallet(env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COINSTORE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "services.wallet"],
        env={**base, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)), **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_every_unsafe_setting_is_named(tmp_path: Path) -> None:
    (tmp_path / "var" / "auth").mkdir(parents=True)
    make_keys(tmp_path / "var" / "auth")
    (tmp_path / "var" / "auth" / "private.pem").rename(tmp_path / "var" / "auth" / "dev-private.pem")
    (tmp_path / "var" / "auth" / "public.pem").rename(tmp_path / "var" / "auth" / "dev-public.pem")
    process = wallet(
        {
            "COINSTORE_ENVIRONMENT": "production",
            "COINSTORE_GRPC_REFLECTION": "true",
            "COINSTORE_CATALOG": str(write_catalog(tmp_path)),
        },
        tmp_path,
    )
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 2, err
    assert err.count("\n") == 1, "one line, no traceback"
    for name in (
        "COINSTORE_AUTH_KEY_POLICY is not set",
        "COINSTORE_AUTH_SIGNING_KEY is the development key",
        "COINSTORE_AUTH_TRUSTED_KEYS is the development key",
        "COINSTORE_GRPC_REFLECTION is on",
        "COINSTORE_DATABASE_URL is SQLite",
        "COINSTORE_BROKER_URL is the embedded SQLite broker",
    ):
        assert name in err, (name, err)


def test_safe_settings_start_in_production(tmp_path: Path, postgres_url: str) -> None:
    keys = make_keys(tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[[keys]]\nkid = "app-1"\npublic_key = "{keys.public_path}"\nsubjects = ["app-backend"]\n'
        'scopes = ["wallet:read"]\n'
    )
    migrate.upgrade("wallet", postgres_url)
    port = free_port()
    process = wallet(
        {
            "COINSTORE_ENVIRONMENT": "production",
            "COINSTORE_DATABASE_URL": postgres_url,
            "COINSTORE_BROKER_URL": "redis://127.0.0.1:6379/15",
            "COINSTORE_AUTH_KEY_POLICY": str(policy),
            "COINSTORE_AUTH_TRUSTED_KEYS": str(keys.public_path),
            "COINSTORE_AUTH_SIGNING_KEY": str(keys.private_path),
            "COINSTORE_CATALOG": str(write_catalog(tmp_path)),
            "COINSTORE_WALLET_GRPC_PORT": str(port),
            "COINSTORE_WALLET_METRICS_PORT": "0",
        },
        tmp_path,
    )
    try:

        async def serving() -> bool:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for _ in range(300):
                    assert process.poll() is None, process.communicate()[1]
                    try:
                        reply = await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(), timeout=1
                        )
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return True
                    except grpc.aio.AioRpcError:
                        pass
                    await asyncio.sleep(0.1)
            return False

        assert asyncio.run(serving())
    finally:
        process.terminate()
        process.wait(30)


def test_outside_urls_must_be_https_and_not_the_simulator() -> None:
    settings = CommonSettings(
        environment=DeployEnvironment.PRODUCTION, test_only_allowed_urls=("https://127.0.0.1:8443/paypal",)
    )
    assert settings.url_problem("PAYPAL_API_URL", "https://api-m.paypal.com") is None
    assert "https only" in (settings.url_problem("PAYPAL_API_URL", "http://api-m.paypal.com") or "")
    assert "simulator" in (settings.url_problem("APPLE_API_URL", "https://127.0.0.1:8443/apple/production") or "")
    assert "simulator" in (settings.url_problem("APPLE_API_URL", "https://localhost/apple") or "")
    assert settings.url_problem("PAYPAL_API_URL", "https://127.0.0.1:8443/paypal") is None
    assert "https only" in (settings.url_problem("PAYPAL_API_URL", "http://127.0.0.1:8443/paypal") or "")
