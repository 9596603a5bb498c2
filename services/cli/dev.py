"""`coinstore dev run`: the whole system in the foreground for development (`make run`).

Creates the dev signing key, migrates the database, starts the store
simulator, the three services and the Celery workers, and stops them all
cleanly on Ctrl-C or SIGTERM. Settings the user exported win over the dev
defaults below.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services.common import auth, migrate
from services.common.settings import CommonSettings, load_settings


def dev_defaults(simulator: str, state: str) -> dict[str, str]:
    """Where the dev defaults point each service: the simulator's keys and URLs."""
    return {
        "COINSTORE_LOG_FORMAT": "text",
        # App Store: the simulator's root CA and In-App Purchase key (written by the simulator at start).
        "COINSTORE_APPLE_ROOT_CERTS": f"{state}/apple/root.der",
        "COINSTORE_APPLE_API_KEY_FILE": f"{state}/apple/SubscriptionKey.p8",
        "COINSTORE_APPLE_API_URL": f"{simulator}/apple/production",
        "COINSTORE_APPLE_SANDBOX_API_URL": f"{simulator}/apple/sandbox",
        # Google Play: the simulator's service account (its token_uri points at the simulator).
        "COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE": f"{state}/google/service-account.json",
        "COINSTORE_GOOGLE_API_ENDPOINT": f"{simulator}/",
        # Pub/Sub push: the simulator signs push tokens with its own key and serves its JWKS.
        "COINSTORE_PUBSUB_JWKS_URL": f"{simulator}/pubsub/jwks",
        # PayPal Payouts: the simulator.
        "COINSTORE_PAYPAL_API_URL": f"{simulator}/paypal",
    }


def dev_catalog(source: Path, target: Path) -> Path:
    """``source`` with diamonds maturing at once, so a newcomer can cash out today
    (`make demo`); everything else as deployed."""
    text, count = re.subn(r"(?m)^holding_days\s*=\s*\d+", "holding_days = 0", source.read_text())
    if count != 1:
        raise RuntimeError(f"{source}: expected one [diamonds] holding_days line, found {count}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"# Written by `coinstore dev run` from {source}: diamonds mature at once.\n{text}")
    return target


STOP_TIMEOUT_SECONDS = 20.0
SIMULATOR_READY_SECONDS = 30.0


@dataclass(frozen=True)
class Process:
    name: str
    argv: tuple[str, ...]


def processes() -> list[Process]:
    python = sys.executable
    return [
        Process("wallet", (python, "-m", "services.wallet")),
        Process("receipts", (python, "-m", "services.receipts")),
        Process("payouts", (python, "-m", "services.payouts")),
        Process("receipts-worker", (python, "-m", "services.receipts.worker", "--beat")),
        Process("payouts-worker", (python, "-m", "services.payouts.worker", "--beat")),
    ]


def dev_environment() -> dict[str, str]:
    env = dict(os.environ)
    if "COINSTORE_CATALOG" not in env:
        env["COINSTORE_CATALOG"] = str(dev_catalog(Path("deploy/catalog.toml"), Path("var/dev-catalog.toml")))
    port = env.get("COINSTORE_STORESIM_PORT", "8090")
    state = env.get("COINSTORE_STORESIM_STATE_DIR", "var/storesim")
    for key, value in dev_defaults(f"http://127.0.0.1:{port}", state).items():
        env.setdefault(key, value)
    # Reflection is opt-in: on for a developer's grpcurl, never in production.
    env.setdefault("COINSTORE_GRPC_REFLECTION", "true")
    return env


def _wait_for_http(url: str, seconds: float, child: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"the store simulator exited with status {child.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (loopback dev URL)
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the store simulator did not answer {url} within {seconds:.0f}s")


def _stop_all(children: list[tuple[Process, subprocess.Popen[bytes]]]) -> None:
    for _proc, child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for proc, child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"coinstore dev: {proc.name} did not stop in time; killing it", file=sys.stderr)
            child.kill()
            child.wait()


def run(_args: argparse.Namespace) -> int:
    env = dev_environment()
    os.environ.update({k: v for k, v in env.items() if k.startswith("COINSTORE_")})
    settings = load_settings(CommonSettings)
    Path("var").mkdir(exist_ok=True)
    auth.generate_keypair(settings.auth_signing_key, settings.auth_trusted_keys[0])
    for service in ("wallet", "receipts", "payouts"):
        migrate.upgrade(service, settings.database_url)
    print(f"coinstore dev: database {settings.database_url} migrated", file=sys.stderr)

    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    children: list[tuple[Process, subprocess.Popen[bytes]]] = []
    simulator = Process("storesim", (sys.executable, "-m", "services.storesim"))
    try:
        child = subprocess.Popen(simulator.argv, env=env, start_new_session=True)
        children.append((simulator, child))
        _wait_for_http(f"http://127.0.0.1:{settings.storesim_port}/healthz", SIMULATOR_READY_SECONDS, child)
        for proc in processes():
            children.append((proc, subprocess.Popen(proc.argv, env=env, start_new_session=True)))
        print(
            f"coinstore dev: running (receipts :{settings.receipts_grpc_port}, wallet :{settings.wallet_grpc_port},"
            f" payouts :{settings.payouts_grpc_port}, webhooks :{settings.webhook_port},"
            f" simulator :{settings.storesim_port}); Ctrl-C stops everything",
            file=sys.stderr,
        )
        while not stopping:
            for proc, child in children:
                if child.poll() is not None:
                    print(f"coinstore dev: {proc.name} exited with status {child.returncode}", file=sys.stderr)
                    stopping = True
                    break
            time.sleep(0.2)
        failed = any(child.poll() not in (None, 0) for _p, child in children)
    except RuntimeError as exc:
        print(f"coinstore dev: {exc}", file=sys.stderr)
        failed = True
    finally:
        _stop_all(children)
    print("coinstore dev: stopped", file=sys.stderr)
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("dev", help="development helpers")
    sub = parser.add_subparsers(dest="dev_command", required=True)
    p = sub.add_parser("run", help="run every service, the workers and the store simulator (make run)")
    p.set_defaults(handler=run)
