"""Loopback ports for test and benchmark servers.

A port the kernel picks (``bind(("127.0.0.1", 0))``) comes from the ephemeral range, where
every outgoing connection of every process also takes its local port: between the check
and the server's own bind, another test's client could take it ("Address already in
use"). So ports come from below that range (32768–60999 on Linux), each pytest-xdist
worker from its own slice, handed out in turn and never twice within a slice's cycle.
"""

from __future__ import annotations

import itertools
import os
import socket

_FIRST, _LAST = 10_000, 25_000  # below the ephemeral range; RabbitMQ's 25672 is above
_SLICES = 6


def _worker_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (_LAST - _FIRST) // _SLICES
    start = _FIRST + (index % _SLICES) * size
    return range(start, start + size)


# This process's slice and its turn through it (process state, like the sockets it names).
_SLICE = _worker_slice()
_candidates = itertools.cycle(_SLICE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and no other test worker
    or outgoing connection will be given."""
    for port in itertools.islice(_candidates, len(_SLICE)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in this worker's range")
