"""Named failpoints: places where a test may stop, kill or fail this process.

Inactive unless ``COINSTORE_FAILPOINTS`` names a point; then :meth:`Failpoints.hit`
costs one dictionary look-up for the points it names and nothing for the rest
(an empty set of points returns at once). The spec is a comma-separated list of
``point=action[@n]``:

- ``kill``: SIGKILL this process (nothing gets to acknowledge, roll back or clean up);
- ``kill-group``: SIGKILL this process's whole process group (a Celery worker with its pool);
- ``stop``: SIGSTOP this process, frozen exactly here until the test kills or continues it;
- ``error``: raise :class:`FailpointError` (an unexpected exception at that point);
- ``sleep:S``: sleep S seconds.

``@n`` fires on the n-th hit in this process (default the first). Every point fires
at most once across all processes sharing ``COINSTORE_FAILPOINTS_DIR``: firing
creates ``<dir>/<point>.fired`` (holding the pid) exclusively, which is also the
test's evidence that the process reached the point. So a restarted worker that
meets the same point again runs through it, and a test can replay a crash exactly.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ACTIONS = ("kill", "kill-group", "stop", "error", "sleep")


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is ``error``."""


@dataclass(frozen=True)
class Action:
    kind: str
    at_hit: int = 1
    seconds: float = 0.0


def parse_spec(raw: str) -> dict[str, Action]:
    """``point=action[:arg][@n],…`` → actions by point; ValueError names what is wrong."""
    actions: dict[str, Action] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, rest = part.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise ValueError(f"{part!r} is not point=action")
        rest, _, hit = rest.partition("@")
        kind, _, arg = rest.strip().partition(":")
        if kind not in ACTIONS:
            raise ValueError(f"{part!r}: action must be one of {', '.join(ACTIONS)}")
        try:
            at_hit = int(hit) if hit else 1
            seconds = float(arg) if kind == "sleep" else 0.0
        except ValueError:
            raise ValueError(f"{part!r}: bad number") from None
        if at_hit < 1 or (kind == "sleep" and seconds < 0):
            raise ValueError(f"{part!r}: out of range")
        actions[name.strip()] = Action(kind, at_hit, seconds)
    return actions


class Failpoints:
    """The failpoints of one process, built once from its settings."""

    def __init__(self, actions: Mapping[str, Action] | None = None, directory: Path | None = None) -> None:
        self._actions = dict(actions or {})
        self._directory = directory or Path("var/failpoints")
        self._hits: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, raw: str, directory: Path) -> Failpoints:
        return cls(parse_spec(raw), directory)

    @property
    def active(self) -> bool:
        return bool(self._actions)

    def hit(self, point: str) -> None:
        if not self._actions:
            return
        action = self._actions.get(point)
        if action is None:
            return
        with self._lock:
            count = self._hits[point] = self._hits.get(point, 0) + 1
        if count != action.at_hit or not self._claim(point):
            return
        if action.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.kind == "kill-group":
            os.killpg(os.getpgid(0), signal.SIGKILL)
        elif action.kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action.kind == "error":
            raise FailpointError(f"failpoint {point}")
        else:
            time.sleep(action.seconds)

    def _claim(self, point: str) -> bool:
        """Mark the point fired, once across every process sharing the directory."""
        self._directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self._directory / f"{point}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as marker:
            marker.write(str(os.getpid()))
            marker.flush()
            os.fsync(marker.fileno())
        return True
