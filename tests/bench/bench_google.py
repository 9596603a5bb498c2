"""Google Play benchmark: end-to-end VerifyGooglePurchase over gRPC at concurrency 64 (``--concurrency``).

The store simulator (Play stand-in, real HTTP and the OAuth JWT-bearer flow),
the wallet and the receipts service run as their own processes
(``python -m services.storesim|wallet|receipts``) on one fresh PostgreSQL
database; this process is the app backend. Each call verifies a new purchase
token: productsv2 look-up at the simulator, the Play rules, the wallet's
CreditPurchase, the purchase + "credited, not consumed" row + AIP-155 response
in one commit, and the consume task queued on the embedded broker.

The App Store path's end-to-end benchmark (tests/bench/bench_apple.py) runs
right after it in the same run, on the same machine, for comparison.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc

from services.storesim.apple import create_store
from tests.bench import bench_apple, common
from tests.bench.common import (
    BenchArgs,
    Result,
    closed_loop,
    percentiles,
    scratch_broker,
    scratch_postgres,
    stop_processes,
)
from tests.support.ports import free_port
from tests.support.waiting import serving

REPO = Path(__file__).resolve().parents[2]


def _post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _buy(simulator: str, product_id: str, account: str) -> str:
    body = {"productId": product_id, "obfuscatedAccountId": account}
    return str(_post_json(f"{simulator}/google/sim/purchases", body)["purchaseToken"])


def _no_push_subscription(simulator: str) -> None:
    """Every purchase also publishes an RTDN. Nothing in this benchmark listens for them,
    and Google's Pub/Sub runs on Google's machines, not on the two cores measured here:
    without this the simulator spent two thirds of its CPU connecting to a closed port and
    retrying (12 attempts, with backoff) every purchase's push. The benchmark measures
    VerifyGooglePurchase, as the App Store one measures VerifyApplePurchase."""
    if _post_json(f"{simulator}/pubsub/control/config", {"push_endpoint": ""})["push_endpoint"] != "":
        raise RuntimeError("the simulator kept its push subscription")


def _wait_http(url: str, process: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the simulator exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


async def _end_to_end(args: BenchArgs) -> Result:
    from coinstore.receipts.v1 import receipt_service_pb2 as pb
    from coinstore.receipts.v1 import receipt_service_pb2_grpc as pb_grpc
    from services.common import migrate
    from tests.support.tokens import make_keys

    binding_class = common.first_of(
        "Binding", "services.receipts.purchases.binding", "services.receipts.domain.binding"
    )

    total = 512 if args.quick else 4000
    concurrency = args.concurrency
    with ExitStack() as stack:
        url = stack.enter_context(scratch_postgres(args.admin_database_url))
        for service in ("wallet", "receipts"):
            migrate.upgrade(service, url)
        state = Path(tempfile.mkdtemp(prefix="bench-google-e2e-"))
        (state / "auth").mkdir()
        keys = make_keys(state / "auth")
        create_store(state)
        broker_url, broker = stack.enter_context(scratch_broker(args.broker_url, state))
        sim_port, wallet_port, receipts_port = (free_port() for _ in range(3))
        simulator = f"http://127.0.0.1:{sim_port}"
        env = {
            **os.environ,
            "COINSTORE_DATABASE_URL": url,
            "COINSTORE_BROKER_URL": broker_url,
            "COINSTORE_CATALOG": str(REPO / "deploy" / "catalog.toml"),
            "COINSTORE_AUTH_TRUSTED_KEYS": str(keys.public_path),
            "COINSTORE_AUTH_SIGNING_KEY": str(keys.private_path),
            "COINSTORE_STORESIM_PORT": str(sim_port),
            "COINSTORE_STORESIM_STATE_DIR": str(state),
            "COINSTORE_WALLET_GRPC_PORT": str(wallet_port),
            "COINSTORE_RECEIPTS_GRPC_PORT": str(receipts_port),
            "COINSTORE_WALLET_ADDRESS": f"127.0.0.1:{wallet_port}",
            "COINSTORE_WALLET_METRICS_PORT": "0",
            "COINSTORE_RECEIPTS_METRICS_PORT": "0",
            "COINSTORE_WEBHOOK_PORT": str(free_port()),
            "COINSTORE_APPLE_ROOT_CERTS": str(state / "apple" / "root.der"),
            "COINSTORE_APPLE_API_KEY_FILE": str(state / "apple" / "SubscriptionKey.p8"),
            "COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE": str(state / "google" / "service-account.json"),
            "COINSTORE_GOOGLE_API_ENDPOINT": simulator + "/",
            "COINSTORE_DB_POOL_SIZE": "32",
            "COINSTORE_LOG_LEVEL": "WARNING",
        }
        children = [subprocess.Popen([sys.executable, "-m", "services.storesim"], env=env, cwd=REPO)]
        try:
            _wait_http(f"{simulator}/healthz", children[0])
            _no_push_subscription(simulator)
            children += [
                subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env, cwd=REPO)
                for name in ("wallet", "receipts")
            ]
            binding = binding_class(env.get("COINSTORE_BINDING_SECRET", "dev-binding-secret-change-me"))
            accounts = [f"fan-{i}" for i in range(concurrency)]
            purchases = []
            for i in range(total + 8):
                account = accounts[i % concurrency]
                token = _buy(simulator, "coins_70", binding.obfuscated_account_id(account))
                purchases.append((f"bench-{i}", account, token))
            await serving(f"127.0.0.1:{wallet_port}", children[1])
            await serving(f"127.0.0.1:{receipts_port}", children[2])
            md = keys.metadata("purchases:verify", subject="app-backend")
            latencies: list[float] = []
            async with grpc.aio.insecure_channel(f"127.0.0.1:{receipts_port}") as channel:
                stub = pb_grpc.ReceiptServiceStub(channel)

                async def call(request_id: str, account: str, token: str) -> None:
                    request = pb.VerifyGooglePurchaseRequest(
                        request_id=request_id, account_id=account, product_id="coins_70", purchase_token=token
                    )
                    began = time.perf_counter()
                    reply = await stub.VerifyGooglePurchase(request, metadata=md, timeout=60)
                    latencies.append(time.perf_counter() - began)
                    assert reply.purchase.state == pb.PURCHASE_STATE_CREDITED, reply

                elapsed = await closed_loop(call, purchases, concurrency, latencies)
        finally:
            stop_processes(children)
        p50, p99 = percentiles(latencies)
        return Result(
            f"google e2e: VerifyGooglePurchase gRPC c={concurrency} (PostgreSQL)",
            len(latencies),
            elapsed,
            p50,
            p99,
            {"cores": str(os.cpu_count()), "processes": "receipts+wallet+storesim", "broker": broker},
        )


def run(args: BenchArgs) -> list[Result]:
    google = asyncio.run(_end_to_end(args))
    apple = asyncio.run(bench_apple._end_to_end(args))
    google.notes["vs_apple_e2e"] = f"{google.per_second / apple.per_second:.0%}" if apple.per_second else "n/a"
    return [google, apple]
