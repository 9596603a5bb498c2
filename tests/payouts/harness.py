"""Real pieces for payouts tests: the PayPal simulator on a free port, the payouts
gRPC service, and Celery worker subprocesses that can be SIGKILLed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from services.payouts.config import PayoutsSettings
from services.storesim import paypal as paypal_sim
from services.storesim.config import StoresimSettings
from tests.support.tokens import Keys
from tests.support.waiting import eventually

REPO_ROOT = Path(__file__).resolve().parents[2]

CATALOG = """
[diamonds]
per_coin = "1"
holding_days = {holding_days}

[payouts]
default_currency = "USD"
minimum_diamonds = 10000

[payouts.rates]
USD = "0.005"
EUR = "0.0045"

[payouts.daily_limit]
USD = "1000.00"

[[packs]]
store = "app_store"
product_id = "com.coinstore.coins.70"
coins = 70
price = "1.29"
currency = "USD"

[[gifts]]
id = "universe"
name = "Universe"
coin_price = 44999
"""


def write_catalog(directory: Path, holding_days: int = 0) -> Path:
    path = directory / f"catalog-{holding_days}.toml"
    path.write_text(CATALOG.format(holding_days=holding_days))
    return path


class PayPalSimServer:
    """The simulator's PayPal routes on a free port, in a thread of this process."""

    def __init__(self, tmp_path: Path) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        settings = StoresimSettings(host="127.0.0.1", port=0, state_dir=tmp_path / "storesim")
        self._app = web.Application(client_max_size=16 * 1024 * 1024)
        paypal_sim.setup(self._app, settings)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the PayPal simulator did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        # A stalled handler (a simulated timeout) must not hold the test's teardown.
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=0.5)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._runner = runner
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        # A handler stalled on purpose outlives the cleanup: cancel it rather than abandon it.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    @property
    def sim(self) -> paypal_sim.PayPalSim:
        return self._app[paypal_sim.SIM]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/paypal"

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"{self.api_url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def faults(self, **faults: Any) -> None:
        self._post("/sim/faults", faults)

    def payments(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.api_url}/sim/payments", timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def payouts_settings(
    *,
    database_url: str,
    broker_url: str,
    catalog: Path,
    keys: Keys,
    wallet_address: str,
    paypal_url: str,
    **overrides: Any,
) -> PayoutsSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "broker_url": broker_url,
        "catalog": catalog,
        "auth_trusted_keys": (keys.public_path,),
        "auth_signing_key": keys.private_path,
        "wallet_address": wallet_address,
        "paypal_api_url": paypal_url,
        "payout_queue": f"payouts-{uuid.uuid4().hex[:8]}",
        # Generous: on a busy machine a healthy call must not time out. Tests of timeouts
        # stall the simulator far beyond the timeout they set.
        "paypal_timeout_seconds": 10.0,
        "payout_poll_seconds": 0.3,
        # Long enough that in a run without crashes the sweeper never re-queues a step that is
        # merely slow, so every step is delivered once; crash tests shorten it.
        "payout_stuck_seconds": 30.0,
        "payout_sweep_seconds": 1.0,
        "payout_daily_batch_hour": -1,
        "payout_chunk_size": 5,
        "db_pool_size": 4,
    }
    values.update(overrides)
    return PayoutsSettings(**values)


def settings_env(settings: PayoutsSettings) -> dict[str, str]:
    """The environment a worker subprocess reads the same settings from."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COINSTORE_")}
    env.update(
        {
            "COINSTORE_DATABASE_URL": settings.database_url,
            "COINSTORE_BROKER_URL": settings.broker_url,
            "COINSTORE_CATALOG": str(settings.catalog),
            "COINSTORE_AUTH_TRUSTED_KEYS": ",".join(str(p) for p in settings.auth_trusted_keys),
            "COINSTORE_AUTH_SIGNING_KEY": str(settings.auth_signing_key),
            "COINSTORE_WALLET_ADDRESS": settings.wallet_address,
            "COINSTORE_PAYPAL_API_URL": settings.paypal_api_url,
            "COINSTORE_PAYPAL_TIMEOUT_SECONDS": str(settings.paypal_timeout_seconds),
            "COINSTORE_PAYOUT_QUEUE": settings.payout_queue,
            "COINSTORE_PAYOUT_POLL_SECONDS": str(settings.payout_poll_seconds),
            "COINSTORE_PAYOUT_STUCK_SECONDS": str(settings.payout_stuck_seconds),
            "COINSTORE_PAYOUT_SWEEP_SECONDS": str(settings.payout_sweep_seconds),
            "COINSTORE_PAYOUT_DAILY_BATCH_HOUR": str(settings.payout_daily_batch_hour),
            "COINSTORE_PAYOUT_CHUNK_SIZE": str(settings.payout_chunk_size),
            "COINSTORE_PAYOUT_SETTLE_CONCURRENCY": str(settings.payout_settle_concurrency),
            "COINSTORE_PAYOUT_RESERVATION_DAYS": str(settings.payout_reservation_days),
            "COINSTORE_PAYOUT_HOLD_MARGIN_SECONDS": str(settings.payout_hold_margin_seconds),
            "COINSTORE_PAYOUT_PARK_AFTER": str(settings.payout_park_after),
            "COINSTORE_LOG_FORMAT": "text",
            "COINSTORE_LOG_LEVEL": "INFO",
            # The generated code of this tree, not whatever the environment points at.
            "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'gen'}",
        }
    )
    return env


# Celery's own line for a task that returned (celery.app.trace, INFO): the evidence a task ran.
_SUCCEEDED = re.compile(r"Task (?P<name>[\w.]+)\[(?P<id>[\w-]+)\] succeeded in [0-9.e-]+s: (?P<result>.*)$", re.M)


class Worker:
    """``python -m services.payouts.worker --beat`` as a real subprocess in its own process group."""

    def __init__(
        self,
        settings: PayoutsSettings,
        cwd: Path,
        concurrency: int = 2,
        beat: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        self._env = {**settings_env(settings), **(env or {})}
        self._cwd = cwd
        self._argv = [sys.executable, "-m", "services.payouts.worker", f"--concurrency={concurrency}"]
        if beat:
            self._argv.append("--beat")
        self._process: subprocess.Popen[bytes] | None = None
        self.log = cwd / "worker.log"
        cwd.mkdir(parents=True, exist_ok=True)

    def start(self) -> Worker:
        handle = self.log.open("ab")
        self._process = subprocess.Popen(
            self._argv, env=self._env, cwd=self._cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        handle.close()
        return self

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once: nothing gets to acknowledge or clean up."""
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError):  # already gone, group and all
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait(10)

    @property
    def returncode(self) -> int | None:
        """None while the worker runs; its exit status once it ended (negative: the signal)."""
        assert self._process is not None
        return self._process.poll()

    def wait_exit(self, timeout: float = 30) -> int:
        """Wait for a worker that is dying on its own (a failpoint's kill-group); its exit status."""
        assert self._process is not None
        return self._process.wait(timeout)

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def results(self) -> dict[str, str]:
        """The repr of what each task that returned gave back, by task id."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return {m["id"]: m["result"] for m in _SUCCEEDED.finditer(text)}


def worker_log(worker: Worker | None) -> Callable[[], str] | None:
    """The worker's log, as the detail of a failed wait."""
    return None if worker is None else (lambda: f"--- worker log ---\n{worker.output()}")


async def exit_status(worker: Worker, timeout: float = 90) -> int:
    """Wait for a worker that is about to die on its own (a failpoint's kill-group); its exit status."""
    await eventually(
        lambda: worker.returncode is not None, "the worker to die", timeout, interval=0.2, detail=worker_log(worker)
    )
    return worker.wait_exit()
