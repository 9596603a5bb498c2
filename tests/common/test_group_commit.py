"""The group-commit batcher (services/common/group_commit.py), without a server."""

from __future__ import annotations

import asyncio

from services.common.group_commit import Batching, GroupCommit


async def test_group_commit_gathers_concurrent_items_and_answers_each() -> None:
    seen: list[list[int]] = []
    running = 0
    most_running = 0

    async def run(items: list[int]) -> list[int]:
        nonlocal running, most_running
        seen.append(items)
        running += 1
        most_running = max(most_running, running)
        await asyncio.sleep(0.01)
        running -= 1
        return [i * 10 for i in items]

    group: GroupCommit[int, int] = GroupCommit(run, window_seconds=0.002, max_batch=50)
    results = await asyncio.gather(*(group.submit(i) for i in range(200)))
    assert results == [i * 10 for i in range(200)]
    assert len(seen) < 20
    assert max(len(batch) for batch in seen) <= 50
    # One batch at a time: what arrives meanwhile forms the next one.
    assert most_running == 1


async def test_group_commit_isolates_a_failing_item() -> None:
    async def run(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("poison")
        return items

    group: GroupCommit[int, int] = GroupCommit(run, window_seconds=0.002, max_batch=50)
    results = await asyncio.gather(*(group.submit(i) for i in range(30)), return_exceptions=True)
    assert isinstance(results[13], RuntimeError)
    assert [r for i, r in enumerate(results) if i != 13] == [i for i in range(30) if i != 13]


class _Gate:
    """A batch run that records each batch and holds the first one until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.first_running = asyncio.Event()
        self.release_first = asyncio.Event()
        self.first_done = asyncio.Event()

    async def run(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        if len(self.batches) == 1:
            self.first_running.set()
            await self.release_first.wait()
            self.first_done.set()
        return items


def _lingering(gate: _Gate, max_batch: int) -> GroupCommit[int, int]:
    """A group commit with a 30 s linger, built as the services build theirs."""
    group = Batching(0.001, max_batch, linger_seconds=30).group(gate.run)
    assert group is not None
    return group


async def test_group_commit_linger_lets_the_next_batch_fill_after_a_batch_ends() -> None:
    gate = _Gate()
    group = _lingering(gate, max_batch=50)
    first = asyncio.ensure_future(group.submit(1))
    await gate.first_running.wait()
    waiting = asyncio.ensure_future(group.submit(2))  # arrives (and sets a window timer) while the first batch runs
    await asyncio.sleep(0)
    gate.release_first.set()
    assert await asyncio.wait_for(first, 5) == 1
    # Many windows pass: only the linger (30 s) or a full batch may send 2 now.
    await asyncio.sleep(0.05)
    late = asyncio.ensure_future(group.submit(3))
    filler = [asyncio.ensure_future(group.submit(100)) for _ in range(48)]
    # 50 waiting fill a batch: it goes at once, not after the linger.
    assert await asyncio.wait_for(asyncio.gather(waiting, late, *filler), 5) == [2, 3] + [100] * 48
    assert gate.batches[1][:2] == [2, 3]
    assert len(gate.batches[1]) == 50


async def test_group_commit_linger_sends_a_full_batch_at_once() -> None:
    gate = _Gate()
    group = _lingering(gate, max_batch=5)
    first = asyncio.ensure_future(group.submit(1))
    await gate.first_running.wait()
    full = [asyncio.ensure_future(group.submit(i)) for i in range(2, 7)]  # a whole batch waits
    await asyncio.sleep(0)
    gate.release_first.set()
    assert await asyncio.wait_for(asyncio.gather(first, *full), 5) == [1, 2, 3, 4, 5, 6]
    assert gate.batches == [[1], [2, 3, 4, 5, 6]]


async def test_group_commit_without_linger_sends_what_waited_at_once() -> None:
    gate = _Gate()
    group: GroupCommit[int, int] = GroupCommit(gate.run, window_seconds=0.001, max_batch=50)
    first = asyncio.ensure_future(group.submit(1))
    await gate.first_running.wait()
    waiting = asyncio.ensure_future(group.submit(2))
    await asyncio.sleep(0)
    gate.release_first.set()
    assert list(await asyncio.wait_for(asyncio.gather(first, waiting), 5)) == [1, 2]
    assert gate.batches == [[1], [2]]


async def test_group_commit_linger_never_delays_an_item_arriving_at_an_idle_group() -> None:
    gate = _Gate()
    gate.release_first.set()
    group = _lingering(gate, max_batch=50)
    assert await asyncio.wait_for(group.submit(1), 5) == 1
    assert await asyncio.wait_for(group.submit(2), 5) == 2
    assert gate.batches == [[1], [2]]


async def test_no_window_means_no_group_commit() -> None:
    gate = _Gate()
    assert Batching().group(gate.run) is None
    assert Batching(0.0, 50, linger_seconds=30).group(gate.run) is None
