"""Reading the evidence a fired failpoint leaves (services/common/failpoints.py)."""

from __future__ import annotations

import time
from pathlib import Path


def fired_pid(directory: Path, point: str) -> int | None:
    """The pid of the process that fired ``point``, or None if none has yet."""
    marker = directory / f"{point}.fired"
    try:
        text = marker.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def wait_fired(directory: Path, point: str, timeout: float) -> int:
    """Block until some process fired ``point``; returns its pid."""
    deadline = time.monotonic() + timeout
    while True:
        pid = fired_pid(directory, point)
        if pid is not None:
            return pid
        if time.monotonic() > deadline:
            raise AssertionError(f"failpoint {point} did not fire within {timeout:.0f}s")
        time.sleep(0.05)


def failpoint_env(directory: Path, *specs: str) -> dict[str, str]:
    """Environment variables that arm ``specs`` (``point=action[@n]``) in a child process."""
    return {"COINSTORE_FAILPOINTS": ",".join(specs), "COINSTORE_FAILPOINTS_DIR": str(directory)}
