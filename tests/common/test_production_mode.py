"""COINSTORE_ENVIRONMENT=production: a real service process refuses to start with unsafe
settings, naming each one, and starts with safe ones."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import migrate
from services.common.settings import CommonSettings, DeployEnvironment
from services.receipts.config import ReceiptsSettings
from tests.support.ports import free_port
from tests.support.tokens import make_keys
from tests.wallet.support import write_catalog

REPO = Path(__file__).resolve().parents[2]


def wallet(env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return service("services.wallet", env, cwd)


def service(module: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COINSTORE_")}
    return subprocess.Popen(
        [sys.executable, "-m", module],
        env={**base, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)), **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def refusal(module: str, env: dict[str, str], cwd: Path) -> str:
    """Start ``module`` in production mode; it must stop with exit 2 and one line (no traceback)."""
    process = service(module, {"COINSTORE_ENVIRONMENT": "production", **env}, cwd)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 2, err
    assert err.count("\n") == 1, "one line, no traceback"
    return err


def test_every_unsafe_setting_is_named(tmp_path: Path) -> None:
    (tmp_path / "var" / "auth").mkdir(parents=True)
    make_keys(tmp_path / "var" / "auth")
    (tmp_path / "var" / "auth" / "private.pem").rename(tmp_path / "var" / "auth" / "dev-private.pem")
    (tmp_path / "var" / "auth" / "public.pem").rename(tmp_path / "var" / "auth" / "dev-public.pem")
    err = refusal(
        "services.wallet",
        {
            "COINSTORE_GRPC_REFLECTION": "true",
            "COINSTORE_CATALOG": str(write_catalog(tmp_path)),
            "COINSTORE_RECEIPTS_DATABASE_URL": "sqlite:///receipts.db",
        },
        tmp_path,
    )
    for name in (
        "COINSTORE_AUTH_KEY_POLICY is not set",
        "COINSTORE_AUTH_TRUSTED_KEYS is the development key",
        "COINSTORE_GRPC_REFLECTION is on",
        "COINSTORE_DATABASE_URL is SQLite",
    ):
        assert name in err, (name, err)
    # The wallet judges what it uses: it has no broker, never opens the receipts database and
    # calls no service (so signs nothing).
    assert "BROKER_URL" not in err, err
    assert "AUTH_SIGNING_KEY" not in err, err
    assert "RECEIPTS_DATABASE_URL" not in err, err


RECEIPTS_UNSAFE = (
    "COINSTORE_BINDING_SECRET is the development secret",
    "COINSTORE_SANDBOX_ACCOUNTS is *",
    "COINSTORE_APPLE_API_URL is 'http://127.0.0.1:8090/apple/production': production calls outside systems over"
    " https only",
    "COINSTORE_APPLE_SANDBOX_API_URL is 'http://127.0.0.1:8090/apple/sandbox'",
    "COINSTORE_GOOGLE_API_ENDPOINT is 'https://127.0.0.1:8090/': a loopback address is the store simulator",
    "COINSTORE_PUBSUB_JWKS_URL is 'http://www.googleapis.com/oauth2/v3/certs'",
    "COINSTORE_APPLE_API_KEY_FILE is the store simulator's",
    "COINSTORE_APPLE_ROOT_CERTS trusts the store simulator's root",
    "COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE is the store simulator's",
    "COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE's token_uri is 'http://127.0.0.1:8090/token'",
    "COINSTORE_RECEIPTS_DATABASE_URL is SQLite",
    "COINSTORE_BROKER_URL is the embedded SQLite broker",
)


def test_receipts_names_each_unsafe_setting_of_its_own(tmp_path: Path) -> None:
    sim = tmp_path / "var" / "storesim" / "google"
    sim.mkdir(parents=True)
    (sim / "service-account.json").write_text(json.dumps({"token_uri": "http://127.0.0.1:8090/token"}))
    err = refusal(
        "services.receipts",
        {
            "COINSTORE_CATALOG": str(write_catalog(tmp_path)),
            "COINSTORE_GOOGLE_API_ENDPOINT": "https://127.0.0.1:8090/",
            "COINSTORE_PUBSUB_JWKS_URL": "http://www.googleapis.com/oauth2/v3/certs",
            "COINSTORE_RECEIPTS_DATABASE_URL": "sqlite:///receipts.db",
            "COINSTORE_PAYPAL_CLIENT_SECRET": "coinstore-dev-secret",
        },
        tmp_path,
    )
    for name in RECEIPTS_UNSAFE:
        assert name in err, (name, err)
    assert "PAYPAL" not in err, "receipts never calls PayPal"


def test_payouts_names_each_unsafe_setting_of_its_own(tmp_path: Path) -> None:
    err = refusal(
        "services.payouts",
        {
            "COINSTORE_CATALOG": str(write_catalog(tmp_path)),
            "COINSTORE_BINDING_SECRET": "dev-binding-secret-change-me",
        },
        tmp_path,
    )
    for name in (
        "COINSTORE_PAYPAL_API_URL is 'http://127.0.0.1:8090/paypal': production calls outside systems over https",
        "COINSTORE_PAYPAL_CLIENT_ID is the development credential",
        "COINSTORE_PAYPAL_CLIENT_SECRET is the development credential",
        "COINSTORE_AUTH_SIGNING_KEY is the development key",
        "COINSTORE_DATABASE_URL is SQLite",
        "COINSTORE_BROKER_URL is the embedded SQLite broker",
    ):
        assert name in err, (name, err)
    assert "BINDING_SECRET" not in err, "payouts derives no bindings"


def safe_receipts(tmp_path: Path) -> ReceiptsSettings:
    account = tmp_path / "sa.json"
    account.write_text(json.dumps({"token_uri": "https://oauth2.googleapis.com/token"}))
    return ReceiptsSettings(
        environment=DeployEnvironment.PRODUCTION,
        database_url="postgresql://receipts@db/coinstore",
        broker_url="redis://redis:6379/0",
        auth_key_policy=tmp_path / "policy.toml",
        auth_trusted_keys=(tmp_path / "app.pem",),
        auth_signing_key=tmp_path / "receipts.pem",
        binding_secret="a-real-secret-of-enough-length",
        sandbox_accounts=("review-account",),
        apple_api_url="https://api.storekit.itunes.apple.com",
        apple_sandbox_api_url="https://api.storekit-sandbox.itunes.apple.com",
        apple_root_certs=(tmp_path / "AppleRootCA-G3.cer",),
        apple_api_key_file=tmp_path / "SubscriptionKey_ABC.p8",
        google_service_account_file=account,
        google_api_endpoint="",
    )


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"binding_secret": "dev-binding-secret-change-me"}, "BINDING_SECRET"),
        ({"sandbox_accounts": ("*",)}, "SANDBOX_ACCOUNTS"),
        ({"apple_api_url": "https://127.0.0.1:8090/apple/production"}, "APPLE_API_URL"),
        ({"apple_sandbox_api_url": "http://api.storekit-sandbox.itunes.apple.com"}, "APPLE_SANDBOX_API_URL"),
        ({"google_api_endpoint": "http://androidpublisher.googleapis.com/"}, "GOOGLE_API_ENDPOINT"),
        ({"pubsub_jwks_url": "https://localhost/certs"}, "PUBSUB_JWKS_URL"),
        ({"apple_api_key_file": Path("var/storesim/apple/SubscriptionKey.p8")}, "APPLE_API_KEY_FILE"),
        ({"apple_root_certs": (Path("var/storesim/apple/root.der"),)}, "APPLE_ROOT_CERTS"),
        ({"google_service_account_file": Path("/srv/storesim/google/sa.json")}, "GOOGLE_SERVICE_ACCOUNT_FILE"),
    ],
)
def test_each_receipts_setting_alone_is_refused(tmp_path: Path, change: dict[str, object], named: str) -> None:
    safe = safe_receipts(tmp_path)
    assert safe.production_problems() == []
    problems = dataclasses.replace(safe, **change).production_problems()  # type: ignore[arg-type]
    assert [problem.startswith(f"COINSTORE_{named}") for problem in problems] == [True], problems


def test_a_service_account_whose_token_uri_is_not_https_is_refused(tmp_path: Path) -> None:
    safe = safe_receipts(tmp_path)
    safe.google_service_account_file.write_text(json.dumps({"token_uri": "http://oauth2.googleapis.com/token"}))
    assert [p.split(" is ")[0] for p in safe.production_problems()] == [
        "COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE's token_uri"
    ]


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
