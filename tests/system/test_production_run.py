"""Production mode, tried here: the store simulator serves https with a test CA,
COINSTORE_TEST_ONLY_ALLOWED_URLS (logged, never in a manifest) lets its loopback
URL through, and a purchase is verified (looked up over https through the
outbound policy) and credited by real receipts and wallet processes running with
COINSTORE_ENVIRONMENT=production on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import httpx
import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as rpb
from coinstore.receipts.v1 import receipt_service_pb2_grpc as rpb_grpc
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as wpb_grpc
from services.common import auth, migrate
from tests.support import env
from tests.support.ports import free_port
from tests.support.receipts_processes import child
from tests.support.tls import LocalCA, make_test_ca
from tests.support.tokens import Keys, make_keys
from tests.support.waiting import serving

REPO = Path(__file__).resolve().parents[2]
PACK = "com.coinstore.coins.350"


def keys_in(directory: Path) -> Keys:
    directory.mkdir(parents=True)
    return make_keys(directory)


def base_env() -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("COINSTORE_")}
    return {**inherited, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'gen'}", "COINSTORE_LOG_FORMAT": "text"}


def wait_https(url: str, ca: LocalCA, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(url, verify=ca.client_context(), timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered: {log.read_text()}")


class System:
    def __init__(self, tmp_path: Path, database_url: str, broker_url: str) -> None:
        self.tmp = tmp_path
        self.ca = make_test_ca(tmp_path / "ca")
        self.sim_dir = tmp_path / "sim"
        self.sim_port = free_port()
        self.sim = f"https://127.0.0.1:{self.sim_port}"
        self.app = keys_in(tmp_path / "app")
        receipts, wallet = keys_in(tmp_path / "receipts"), keys_in(tmp_path / "wallet")
        policy = tmp_path / "policy.toml"
        policy.write_text(
            f'[[keys]]\nkid = "app-1"\npublic_key = "{self.app.public_path}"\nsubjects = ["app-backend"]\n'
            'scopes = ["purchases:verify", "wallet:read"]\n\n'
            f'[[keys]]\nkid = "receipts-1"\npublic_key = "{receipts.public_path}"\nsubjects = ["receipts"]\n'
            # What the receipts service asks of the wallet (wiring.WALLET_SCOPES), as the manifests grant it.
            'scopes = ["wallet:credit", "wallet:purchases", "wallet:read"]\n'
        )
        self.wallet_port, self.receipts_port = free_port(), free_port()
        common = {
            **base_env(),
            "COINSTORE_ENVIRONMENT": "production",
            "COINSTORE_DATABASE_URL": database_url,
            "COINSTORE_BROKER_URL": broker_url,
            "COINSTORE_AUTH_KEY_POLICY": str(policy),
            "COINSTORE_AUTH_TRUSTED_KEYS": str(self.app.public_path),
            "COINSTORE_CATALOG": str(REPO / "deploy" / "catalog.toml"),
            "COINSTORE_TLS_CA_FILE": str(self.ca.ca_file),
            "COINSTORE_WALLET_ADDRESS": f"127.0.0.1:{self.wallet_port}",
        }
        self.storesim_env = {
            **base_env(),
            "COINSTORE_STORESIM_PORT": str(self.sim_port),
            "COINSTORE_STORESIM_STATE_DIR": str(self.sim_dir),
            "COINSTORE_STORESIM_TLS_CERT_FILE": str(self.ca.cert_file),
            "COINSTORE_STORESIM_TLS_KEY_FILE": str(self.ca.key_file),
        }
        self.wallet_env = {
            **common,
            "COINSTORE_AUTH_SIGNING_KEY": str(wallet.private_path),
            "COINSTORE_WALLET_GRPC_PORT": str(self.wallet_port),
            "COINSTORE_WALLET_METRICS_PORT": "0",
        }
        self.receipts_env = {
            **common,
            "COINSTORE_AUTH_SIGNING_KEY": str(receipts.private_path),
            "COINSTORE_AUTH_SIGNING_KEY_ID": "receipts-1",
            "COINSTORE_RECEIPTS_GRPC_PORT": str(self.receipts_port),
            "COINSTORE_WEBHOOK_PORT": str(free_port()),
            "COINSTORE_RECEIPTS_METRICS_PORT": "0",
            "COINSTORE_BINDING_SECRET": "a-production-binding-secret",
            "COINSTORE_SANDBOX_ACCOUNTS": "app-review-demo",
            "COINSTORE_APPLE_API_URL": f"{self.sim}/apple/production",
            "COINSTORE_APPLE_SANDBOX_API_URL": f"{self.sim}/apple/sandbox",
            "COINSTORE_APPLE_ROOT_CERTS": str(self.sim_dir / "apple" / "root.der"),
            "COINSTORE_APPLE_API_KEY_FILE": str(self.sim_dir / "apple" / "SubscriptionKey.p8"),
            "COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE": str(self.sim_dir / "google" / "service-account.json"),
            "COINSTORE_GOOGLE_API_ENDPOINT": f"{self.sim}/",
            "COINSTORE_PUBSUB_JWKS_URL": f"{self.sim}/pubsub/jwks",
            "COINSTORE_TEST_ONLY_ALLOWED_URLS": f"{self.sim}/",
        }

    def md(self, *scopes: str) -> tuple[tuple[str, str], ...]:
        token = auth.mint_token(self.app.private_key, "app-backend", scopes, 600, kid="app-1")
        return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def system(tmp_path: Path, postgres_url: str) -> Iterator[System]:
    broker = env.server_broker_url("redis")
    migrate.upgrade("wallet", postgres_url)
    migrate.upgrade("receipts", postgres_url)
    world = System(tmp_path, postgres_url, broker)
    with ExitStack() as stack:
        sim_log = tmp_path / "storesim.log"
        sim = stack.enter_context(child(["-m", "services.storesim"], world.storesim_env, tmp_path, sim_log))
        wait_https(f"{world.sim}/healthz", world.ca, sim, sim_log)
        yield world


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_purchase_is_verified_and_credited_in_production_mode(system: System) -> None:
    with ExitStack() as stack:
        logs = {name: system.tmp / f"{name}.log" for name in ("wallet", "receipts")}
        wallet = stack.enter_context(child(["-m", "services.wallet"], system.wallet_env, system.tmp, logs["wallet"]))
        receipts = stack.enter_context(
            child(["-m", "services.receipts"], system.receipts_env, system.tmp, logs["receipts"])
        )
        for port, process, log in (
            (system.wallet_port, wallet, logs["wallet"]),
            (system.receipts_port, receipts, logs["receipts"]),
        ):
            asyncio.run(serving(f"127.0.0.1:{port}", process, detail=log.read_text))

        async def purchase() -> tuple[rpb.VerifyApplePurchaseResponse, int]:
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{system.receipts_port}") as receipts_channel,
                grpc.aio.insecure_channel(f"127.0.0.1:{system.wallet_port}") as wallet_channel,
            ):
                stub = rpb_grpc.ReceiptServiceStub(receipts_channel)
                binding = await stub.GetPurchaseBinding(
                    rpb.GetPurchaseBindingRequest(account_id="fan-1"),
                    metadata=system.md("purchases:verify"),
                    timeout=10,
                )
                async with httpx.AsyncClient(verify=system.ca.client_context()) as client:
                    bought = await client.post(
                        f"{system.sim}/apple/buy",
                        json={"productId": PACK, "appAccountToken": binding.app_account_token},
                        timeout=10,
                    )
                bought.raise_for_status()
                verified = await stub.VerifyApplePurchase(
                    rpb.VerifyApplePurchaseRequest(
                        request_id="r-1", account_id="fan-1", transaction_id=bought.json()["transactionId"]
                    ),
                    metadata=system.md("purchases:verify"),
                    timeout=30,
                )
                balance = await wpb_grpc.WalletServiceStub(wallet_channel).GetBalance(
                    wpb.GetBalanceRequest(account_id="fan-1"), metadata=system.md("wallet:read"), timeout=10
                )
                return verified, balance.balance.coins

        verified, coins = asyncio.run(purchase())
        assert verified.purchases[0].state == rpb.PURCHASE_STATE_CREDITED, logs["receipts"].read_text()
        assert coins == verified.purchases[0].coins_credited == 350
    assert "COINSTORE_TEST_ONLY_ALLOWED_URLS lets" in logs["receipts"].read_text()


def test_without_the_test_only_override_the_simulator_is_refused(system: System) -> None:
    environ = {k: v for k, v in system.receipts_env.items() if k != "COINSTORE_TEST_ONLY_ALLOWED_URLS"}
    process = subprocess.run(
        [sys.executable, "-m", "services.receipts"],
        env=environ,
        cwd=system.tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 2, process.stderr
    for name in ("APPLE_API_URL", "APPLE_SANDBOX_API_URL", "GOOGLE_API_ENDPOINT", "PUBSUB_JWKS_URL", "token_uri"):
        assert f"{name} is '{system.sim}" in process.stderr or f"{name} is 'https://127.0.0.1" in process.stderr, (
            name,
            process.stderr,
        )
