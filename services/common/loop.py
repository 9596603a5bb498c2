"""Synchronous code (Celery tasks, worker threads) calling asyncio code: the
coroutine runs on an event loop another thread owns, and the caller waits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CALL_TIMEOUT_SECONDS = 60.0


class OnLoop:
    """Runs coroutines on ``loop``, which a thread other than the caller's runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_seconds: float = CALL_TIMEOUT_SECONDS) -> None:
        self.loop = loop
        self._timeout = timeout_seconds

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for its result (or its exception)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(self._timeout)


class LoopThread(OnLoop):
    """An event loop of its own, running in a daemon thread."""

    def __init__(self, name: str = "asyncio-loop") -> None:
        super().__init__(asyncio.new_event_loop())
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
