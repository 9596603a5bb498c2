"""The whole system as real processes on free ports, for the system suite and the soak.

Three gRPC services (the receipts process also serves the stores' webhooks), both
Celery workers with beat, and the store simulator; on a PostgreSQL database of
the test's own and a real broker (Redis or RabbitMQ) with queues of its own.
Everything is reached through the public interfaces: gRPC, HTTP, the CLI. A
process can be killed and restarted, or started with failpoints armed or with
its database or broker behind a fault proxy the test owns.

No pytest here: ``python -m tests.system.soak`` drives the same harness.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coinstore.payouts.v1 import payout_service_pb2_grpc as ppb_grpc
from coinstore.receipts.v1 import receipt_service_pb2_grpc as rpb_grpc
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as wpb_grpc
from services.cli.dev import dev_catalog, dev_defaults
from tests.support.ports import free_port
from tests.support.tokens import Keys, make_keys

REPO = Path(__file__).resolve().parents[2]
APP_SCOPES = ("purchases:verify", "wallet:read", "wallet:gift", "wallet:limits", "payouts:request")
SERVICES = ("wallet", "receipts", "payouts")
START_SECONDS = 60.0
STOP_SECONDS = 20.0


@dataclass(frozen=True)
class Spec:
    name: str
    args: tuple[str, ...]
    grpc_port_setting: str = ""


SPECS = {
    s.name: s
    for s in (
        Spec("storesim", ("-m", "services.storesim")),
        Spec("wallet", ("-m", "services.wallet"), "WALLET_GRPC_PORT"),
        Spec("receipts", ("-m", "services.receipts"), "RECEIPTS_GRPC_PORT"),
        Spec("payouts", ("-m", "services.payouts"), "PAYOUTS_GRPC_PORT"),
        Spec("receipts-worker", ("-m", "services.receipts.worker", "--beat")),
        Spec("payouts-worker", ("-m", "services.payouts.worker", "--beat")),
    )
}


class SystemFailure(AssertionError):
    """The system did not do what a scenario needs (a process would not start, a wait ran out)."""


@dataclass
class System:
    directory: Path
    database_url: str
    broker_url: str
    keys: Keys
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)
    channels: list[grpc.Channel] = field(default_factory=list)

    # -- processes ---------------------------------------------------------------
    def port(self, setting: str) -> int:
        return int(self.env[f"COINSTORE_{setting}"])

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.port(SPECS[service].grpc_port_setting)}"

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.port('STORESIM_PORT')}"

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.port('WEBHOOK_PORT')}"

    @property
    def failpoints_dir(self) -> Path:
        return Path(self.env["COINSTORE_FAILPOINTS_DIR"])

    def start(self, name: str, **settings: str) -> None:
        """Start process ``name``; ``settings`` (COINSTORE_* without the prefix) hold
        for this start only, e.g. FAILPOINTS or DATABASE_URL through a fault proxy."""
        spec = SPECS[name]
        env = {**self.env, **self.overrides.get(name, {}), **{f"COINSTORE_{k}": v for k, v in settings.items()}}
        log = (self.directory / "logs" / f"{name}.log").open("ab")
        try:
            self.processes[name] = subprocess.Popen(
                [sys.executable, *spec.args],
                env=env,
                cwd=self.directory,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()

    def kill(self, name: str) -> None:
        """SIGKILL the process and all it started (a worker's pool too)."""
        process = self.processes.get(name)
        if process is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_SECONDS)

    def stop(self, name: str) -> None:
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill(name)

    def exited(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is None or process.poll() is not None

    def wait_exited(self, name: str, timeout: float) -> None:
        """Wait for a process to die by itself (a failpoint that kills)."""
        process = self.processes[name]
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise SystemFailure(f"{name} did not exit within {timeout:.0f}s") from None
        # A worker's pool children die with the group's SIGKILL; make sure of it.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def wait_serving(self, *names: str, timeout: float = START_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            while not self._serving(name):
                if self.exited(name):
                    raise SystemFailure(f"{name} exited at start-up:\n{self.log_tail(name)}")
                if time.monotonic() > deadline:
                    raise SystemFailure(f"{name} not SERVING within {timeout:.0f}s:\n{self.log_tail(name)}")
                time.sleep(0.2)

    def _serving(self, name: str) -> bool:
        if name == "storesim":
            try:
                with urllib.request.urlopen(self.sim_url + "/healthz", timeout=1):
                    return True
            except OSError:
                return False
        if not SPECS[name].grpc_port_setting:
            return not self.exited(name)
        with grpc.insecure_channel(self.address(name)) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def serving(self) -> dict[str, bool]:
        return {name: self._serving(name) for name in SERVICES}

    def restart(self, name: str, **settings: str) -> None:
        self.kill(name)
        self.start(name, **settings)
        self.wait_serving(name)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.directory / "logs" / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # -- clients -----------------------------------------------------------------
    def metadata(self, *scopes: str) -> tuple[tuple[str, str], ...]:
        return self.keys.metadata(*(scopes or APP_SCOPES), subject="system-test")

    def channel(self, service: str) -> grpc.Channel:
        channel = grpc.insecure_channel(self.address(service))
        self.channels.append(channel)
        return channel

    def receipts(self) -> rpb_grpc.ReceiptServiceStub:
        return rpb_grpc.ReceiptServiceStub(self.channel("receipts"))

    def wallet(self) -> wpb_grpc.WalletServiceStub:
        return wpb_grpc.WalletServiceStub(self.channel("wallet"))

    def payouts(self) -> ppb_grpc.PayoutServiceStub:
        return ppb_grpc.PayoutServiceStub(self.channel("payouts"))

    def balance(self, account: str) -> wpb.Balance:
        reply = self.wallet().GetBalance(
            wpb.GetBalanceRequest(account_id=account), metadata=self.metadata("wallet:read"), timeout=10
        )
        return reply.balance

    def sim(self, path: str, body: Mapping[str, Any] | None = None, method: str | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.sim_url + path, data=data, method=method, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read() or b"{}")

    def cli(self, *args: str, timeout: float = 300, **settings: str) -> subprocess.CompletedProcess[str]:
        env = {**self.env, **{f"COINSTORE_{k}": v for k, v in settings.items()}}
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=env,
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def audit(self) -> str:
        """`coinstore wallet audit`; any discrepancy fails."""
        done = self.cli("wallet", "audit")
        if done.returncode != 0:
            raise SystemFailure(f"coinstore wallet audit failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout.strip()

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.channels.clear()
        # The scenario and its audit are over: nothing left to shut down gracefully.
        for name in reversed(list(self.processes)):
            self.kill(name)


def wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemFailure(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)


def system_env(directory: Path, database_url: str, broker_url: str, keys: Keys) -> dict[str, str]:
    ports = {
        name: free_port()
        for name in (
            "RECEIPTS_GRPC_PORT",
            "WALLET_GRPC_PORT",
            "PAYOUTS_GRPC_PORT",
            "WEBHOOK_PORT",
            "STORESIM_PORT",
            "RECEIPTS_METRICS_PORT",
        )
    }
    state = directory / "storesim"
    sim = f"http://127.0.0.1:{ports['STORESIM_PORT']}"
    run = uuid.uuid4().hex[:10]
    env = {
        **os.environ,
        **dev_defaults(sim, str(state)),
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'gen'}",
        **{f"COINSTORE_{k}": str(v) for k, v in ports.items()},
        "COINSTORE_WALLET_METRICS_PORT": "0",
        "COINSTORE_PAYOUTS_METRICS_PORT": "0",
        "COINSTORE_DATABASE_URL": database_url,
        "COINSTORE_BROKER_URL": broker_url,
        "COINSTORE_WALLET_ADDRESS": f"127.0.0.1:{ports['WALLET_GRPC_PORT']}",
        "COINSTORE_AUTH_SIGNING_KEY": str(keys.private_path),
        "COINSTORE_AUTH_TRUSTED_KEYS": str(keys.public_path),
        "COINSTORE_CATALOG": str(dev_catalog(REPO / "deploy" / "catalog.toml", directory / "catalog.toml")),
        "COINSTORE_STORESIM_STATE_DIR": str(state),
        "COINSTORE_PUBSUB_AUDIENCE": f"http://127.0.0.1:{ports['WEBHOOK_PORT']}/notifications/google",
        "COINSTORE_RECEIPTS_QUEUE": f"sys-receipts-{run}",
        "COINSTORE_PAYOUT_QUEUE": f"sys-payouts-{run}",
        # Recovery of lost work within a scenario's time, not an hour.
        # The sweep re-queues every row pending longer than one interval: far below the
        # time a storm's backlog takes, it would queue the backlog again and again.
        "COINSTORE_NOTIFICATIONS_SWEEP_SECONDS": "10",
        "COINSTORE_PAYOUT_POLL_SECONDS": "0.5",
        "COINSTORE_PAYOUT_SWEEP_SECONDS": "2",
        "COINSTORE_PAYOUT_STUCK_SECONDS": "6",
        "COINSTORE_PAYOUT_DAILY_BATCH_HOUR": "-1",
        "COINSTORE_SHUTDOWN_GRACE_SECONDS": "2",
        "COINSTORE_APPLE_API_TIMEOUT_SECONDS": "5",
        "COINSTORE_GOOGLE_API_TIMEOUT_SECONDS": "5",
        "COINSTORE_PAYPAL_TIMEOUT_SECONDS": "5",
        "COINSTORE_FAILPOINTS_DIR": str(directory / "failpoints"),
        "COINSTORE_LOG_FORMAT": "text",
        "COINSTORE_GRPC_REFLECTION": "false",
    }
    env.pop("COINSTORE_FAILPOINTS", None)
    return env


def configure_simulator(system: System) -> None:
    """Point the simulator's notification senders at this system's webhooks, retrying fast."""
    system.sim(
        "/apple/notifications/config",
        {"webhook_url": system.webhook_url + "/notifications/apple/v2", "retry_delays_seconds": [0.5, 1, 2, 4, 8]},
    )
    google = system.webhook_url + "/notifications/google"
    system.sim(
        "/pubsub/control/config",
        {"push_endpoint": google, "audience": google, "retry_initial_seconds": 0.5, "retry_max_seconds": 4},
    )


def queue_depth(broker_url: str, queue: str) -> int:
    """Messages waiting in one of this system's queues (its own: no other test uses it)."""
    from amqp.exceptions import ChannelError  # type: ignore[import-untyped]
    from kombu.connection import Connection

    with Connection(broker_url, connect_timeout=5) as conn:
        try:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
        except ChannelError:  # 404: Redis keeps no empty queue, so nothing waits
            return 0


def wait_drained(system: System, timeout: float) -> None:
    """Until the receipts queue is empty: work queued twice (a sweep re-queues rows still
    waiting in a long queue) finishes before the next scenario measures its own."""
    queue = system.env["COINSTORE_RECEIPTS_QUEUE"]
    wait_until(f"queue {queue} drained", lambda: queue_depth(system.broker_url, queue) == 0, timeout, 1.0)


def drop_queues(broker_url: str, queues: list[str]) -> None:
    if broker_url.startswith("sqla+"):
        return
    from kombu.connection import Connection

    with suppress(Exception), Connection(broker_url, connect_timeout=3) as conn:
        for queue in queues:
            with suppress(Exception):
                conn.default_channel.queue_delete(queue)


@contextmanager
def running_system(
    directory: Path,
    database_url: str,
    broker_url: str,
    *,
    overrides: Mapping[str, Mapping[str, str]] | None = None,
    audit: bool = True,
) -> Iterator[System]:
    """Migrate, start every process and wait until each serves; on the way out,
    ``coinstore wallet audit`` (a discrepancy fails), then stop everything.

    ``overrides`` are per-process settings (without the prefix) for every start."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "logs").mkdir(exist_ok=True)
    (directory / "auth").mkdir(exist_ok=True)
    keys = make_keys(directory / "auth")
    env = system_env(directory, database_url, broker_url, keys)
    system = System(
        directory,
        database_url,
        broker_url,
        keys,
        env,
        overrides={n: {f"COINSTORE_{k}": v for k, v in o.items()} for n, o in (overrides or {}).items()},
    )
    with ExitStack() as stack:
        stack.callback(drop_queues, broker_url, [env["COINSTORE_RECEIPTS_QUEUE"], env["COINSTORE_PAYOUT_QUEUE"]])
        stack.callback(system.close)
        migrated = system.cli("migrate")
        if migrated.returncode != 0:
            raise SystemFailure(f"coinstore migrate failed:\n{migrated.stderr}")
        system.start("storesim")
        system.wait_serving("storesim")
        configure_simulator(system)
        for name in ("wallet", "receipts", "payouts", "receipts-worker", "payouts-worker"):
            system.start(name)
        system.wait_serving(*SERVICES)
        yield system
        if audit:
            system.audit()


def dump_logs(system: System, names: tuple[str, ...] = tuple(SPECS)) -> str:
    return "\n".join(f"--- {name} ---\n{system.log_tail(name, 15)}" for name in names)


def run_demo(system: System, timeout: float = 180) -> str:
    """`coinstore demo` against this system, exactly as `make demo` runs it."""
    done = system.cli("demo", "--wait", "60", timeout=timeout)
    if done.returncode != 0 or "demo complete" not in done.stdout:
        raise SystemFailure(f"coinstore demo failed:\n{done.stdout}\n{done.stderr}\n{dump_logs(system)}")
    return done.stdout


def http_status(url: str, body: bytes, headers: Mapping[str, str], timeout: float = 30) -> int:
    """POST ``body``; the status, read even when the server answered (413) before the
    body was sent in full and closed the connection; 0 if it closed without answering."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        with suppress(BrokenPipeError, ConnectionResetError):
            connection.request("POST", parts.path, body=body, headers=dict(headers))
        try:
            reply = connection.getresponse()
        except (http.client.HTTPException, ConnectionError):
            return 0
        reply.read()
        return int(reply.status)
    finally:
        connection.close()
