"""Group commit: work items that arrive within a short window share one run (the
wallet's gifts and credits one database transaction, receipts' purchase records
one transaction and their credits one CreditPurchases call), each keeping its own
keys and answer.

While a batch is running, new arrivals keep queueing and form the next one, so
the batch size grows with the load (classic group commit, like a WAL flush). One
batch in flight: with two, batches were half the size and the
per-statement cost per item doubled (CreditPurchase throughput fell by a quarter
in the benchmark). A batch that fails as a whole is retried item by item, so one
bad item cannot fail its neighbours.

``linger_seconds`` (0: none) lets the next batch fill for that long after a batch
ends, when items are already waiting (a full batch goes at once; an item arriving
at an idle group waits only the window). Under load the batches grow and the cost
of each, shared by more items, shrinks: a CPU-bound path gains more than the linger
costs in latency (the receipts purchase path, see the README).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


@dataclass(frozen=True)
class Batching:
    """How concurrent items share a run: the window, the largest batch and the linger
    (``window_seconds`` 0: no group commit, each item runs alone)."""

    window_seconds: float = 0.0
    max_batch: int = 1
    linger_seconds: float = 0.0

    def group(self, run: Callable[[list[I]], Awaitable[list[R]]]) -> GroupCommit[I, R] | None:
        """A group commit of ``run`` under these rules, or None when items run alone."""
        if self.window_seconds <= 0:
            return None
        return GroupCommit(
            run, window_seconds=self.window_seconds, max_batch=self.max_batch, linger_seconds=self.linger_seconds
        )


class GroupCommit(Generic[I, R]):
    def __init__(
        self,
        run: Callable[[list[I]], Awaitable[list[R]]],
        *,
        window_seconds: float,
        max_batch: int,
        linger_seconds: float = 0.0,
    ) -> None:
        self._run = run
        self._window = window_seconds
        self._max_batch = max_batch
        self._linger = linger_seconds
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._running = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: I) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self._max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._window, self._on_timer)
        return await future

    def _on_timer(self) -> None:
        self._timer = None
        self._flush()

    def _flush(self) -> None:
        if self._running or not self._pending:
            return  # the running batch flushes again when it finishes
        batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
        if not self._pending and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._running = True
        task = asyncio.get_running_loop().create_task(self._run_batch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            try:
                results = await self._run([item for item, _ in batch])
                pairs = list(zip(batch, results, strict=True))
            except Exception:
                if len(batch) == 1:
                    raise
                log.warning("a batch of %d failed; retrying its items one by one", len(batch), exc_info=True)
                pairs = []
                for entry in batch:
                    try:
                        pairs.append((entry, (await self._run([entry[0]]))[0]))
                    except Exception as exc:
                        if not entry[1].done():
                            entry[1].set_exception(exc)
            for (_, future), result in pairs:
                if not future.done():
                    future.set_result(result)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._running = False
            if self._pending:
                self._next_batch()

    def _next_batch(self) -> None:
        """After a batch, with items waiting: the next one goes now, or once it has lingered."""
        if self._linger <= 0 or len(self._pending) >= self._max_batch:
            self._flush()
            return
        if self._timer is not None:
            self._timer.cancel()  # a window timer set while the batch ran would cut the linger short
        self._timer = asyncio.get_running_loop().call_later(self._linger, self._on_timer)
