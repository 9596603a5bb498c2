"""A TCP proxy the test owns, between a process and a server it depends on
(PostgreSQL, a broker, a simulator), that can pass, reset or hang connections.

Faults are injected here, never by stopping the machine's shared servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Mode(enum.Enum):
    PASS = "pass"  # forward bytes both ways
    RESET = "reset"  # reset every open connection and every new one (RST, as a crashed peer)
    HANG = "hang"  # accept, then forward nothing (a black hole: callers hit their timeouts)
    DROP = "drop"  # close every open connection and every new one (FIN: the peer went away cleanly)


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._mode = Mode.PASS
        self._loop = asyncio.new_event_loop()
        self._links: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_mode(self, mode: Mode) -> None:
        """Switch mode; RESET and DROP also end every connection open now."""
        asyncio.run_coroutine_threadsafe(self._switch(mode), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _switch(self, mode: Mode) -> None:
        self._mode = mode
        if mode in (Mode.RESET, Mode.DROP):
            for writer in list(self._links):
                if mode is Mode.RESET:
                    _reset(writer)
                else:
                    writer.close()
            self._links.clear()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._links):
            _reset(writer)
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._mode is Mode.RESET:
            _reset(writer)
            return
        if self._mode is Mode.DROP:
            writer.close()
            return
        self._links.add(writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            _reset(writer)
            return
        self._links.add(upstream_writer)
        await asyncio.gather(
            self._pipe(reader, upstream_writer, writer), self._pipe(upstream_reader, writer, upstream_writer)
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                while self._mode is Mode.HANG:
                    await asyncio.sleep(0.05)
                if self._mode in (Mode.RESET, Mode.DROP):
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for end in (writer, peer):
                self._links.discard(end)
                with contextlib.suppress(Exception):
                    end.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer sees a connection reset, as from a crashed server."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextmanager
def fault_proxy(target_host: str, target_port: int) -> Iterator[FaultProxy]:
    proxy = FaultProxy(target_host, target_port).start()
    try:
        yield proxy
    finally:
        proxy.stop()
