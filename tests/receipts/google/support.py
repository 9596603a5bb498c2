"""The Play simulator on a free port, and a receipts service pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from aiohttp import web

from services.storesim import google as play_sim
from services.storesim.config import StoresimSettings
from tests.receipts.support import Receipts, receipts_service
from tests.support.tls import serve_in_thread
from tests.support.tokens import Keys

PACKAGE = "com.coinstore.app"


@asynccontextmanager
async def play_simulator(state_dir: Path) -> AsyncIterator[tuple[play_sim.PlayState, str]]:
    """The Google Play stand-in on a free port: (its state, base URL). The
    service-account key file it writes points its token_uri at this port."""
    app = web.Application()
    play_sim.setup(app, StoresimSettings(state_dir=state_dir, port=0))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    state = app[play_sim.PLAY_STATE]
    state.write_service_account(base)
    try:
        yield state, base
    finally:
        await runner.cleanup()


def google_settings(state: play_sim.PlayState, base_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "GOOGLE_SERVICE_ACCOUNT_FILE": str(state.service_account_path),
        "GOOGLE_API_ENDPOINT": base_url + "/",
        "GOOGLE_API_TIMEOUT_SECONDS": "2",
        "BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
    }


@asynccontextmanager
async def google_receipts(
    keys: Keys, database_url: str, tmp_path: Path, extra: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[Receipts, play_sim.PlayState]]:
    """The simulator, the fake wallet and a real receipts service wired to both."""
    async with play_simulator(tmp_path) as (state, base):
        settings = {**google_settings(state, base, tmp_path), **dict(extra or {})}
        async with receipts_service(keys, database_url, tmp_path, settings) as receipts:
            yield receipts, state


@contextmanager
def play_simulator_thread(state_dir: Path) -> Iterator[tuple[play_sim.PlayState, str]]:
    """The simulator served from its own thread and event loop, for synchronous
    tests and for subprocesses (works whether or not the caller runs a loop)."""
    app = web.Application()
    play_sim.setup(app, StoresimSettings(state_dir=state_dir, port=0))
    with serve_in_thread(app) as port:
        base = f"http://127.0.0.1:{port}"
        state = app[play_sim.PLAY_STATE]
        state.write_service_account(base)
        yield state, base
