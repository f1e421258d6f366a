"""A fault-injecting TCP proxy for tests: Soniq connects to the proxy, the proxy to
PostgreSQL, and the test decides what happens to the bytes in between.

Modes (``proxy.mode = ...``, effective at once, for open and new connections):

- ``pass``: forward everything.
- ``drop``: abort every open connection now (RST) and abort new ones at accept, until
  the mode changes: a server that went away, or a firewall that rejects.
- ``stall``: accept, forward nothing in either direction, close nothing; held bytes
  flow again when the mode returns to ``pass`` (a server that is frozen, a
  ``SIGSTOP``ped backend, a saturated link).
- ``slow``: forward each chunk after ``delay`` seconds.
- ``half_open``: bytes from the server to the client vanish, nothing is closed; a
  connection that lost bytes so is dead for good (it keeps swallowing both ways and
  never closes), like a peer whose NAT mapping expired. New connections after the mode
  returns to ``pass`` work.

Besides the modes, :meth:`FaultProxy.silence` half-opens the connections open at that
moment, one way (the server's bytes to them vanish, the client's still reach the
server), while new connections pass: a link that silently drops one direction.

The proxy runs an asyncio loop in a daemon thread, so tests drive it from plain code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

MODES = ("pass", "drop", "stall", "slow", "half_open")
T = TypeVar("T")


class _Link:
    """One proxied connection's fate: ``silent``, the server's bytes to it vanish
    (:meth:`FaultProxy.silence`); ``dead``, it lost bytes in ``half_open`` mode and
    swallows both ways."""

    silent = False
    dead = False


class FaultProxy:
    """``FaultProxy(upstream_host, upstream_port)``; ``start()`` binds a free port of
    127.0.0.1 (``self.port``); ``stop()`` closes everything."""

    def __init__(self, upstream_host: str, upstream_port: int, *, delay: float = 0.05) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay
        self._mode = "pass"
        self.port = 0
        self.accepted = 0
        self.aborted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._links: set[_Link] = set()
        self._mode_changed: asyncio.Event | None = None

    @classmethod
    def to(cls, url: str, *, delay: float = 0.05) -> FaultProxy:
        """A proxy (not started) to the server of ``url``, a PostgreSQL URL."""
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432, delay=delay)

    # -- control, from any thread ---------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")

        def apply() -> None:
            self._mode = value
            if value == "drop":
                for writer in list(self._writers):
                    self._abort(writer)
            assert self._mode_changed is not None
            self._mode_changed.set()
            self._mode_changed = asyncio.Event()

        self._on_loop(apply)

    def silence(self) -> int:
        """Half-open every connection open now, for good and one way: the server's
        bytes to it vanish, the client's still reach the server, nothing is closed.
        Connections opened afterwards pass. How many were silenced."""

        def apply() -> int:
            links = [link for link in self._links if not link.silent]
            for link in links:
                link.silent = True
            return len(links)

        return self._on_loop(apply)

    def connections(self) -> int:
        """How many connections are open now and pass bytes (neither silenced nor
        dead): 0 once ``drop`` has closed them all."""
        return self._on_loop(
            lambda: sum(1 for link in self._links if not (link.silent or link.dead))
        )

    def through(self, url: str) -> str:
        """``url`` (a PostgreSQL URL) pointing at the proxy instead of its server."""
        parts = urlsplit(url)
        user, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{user}{at}127.0.0.1:{self.port}"))

    def _on_loop(self, call: Callable[[], T]) -> T:
        """Run ``call`` on the proxy's loop (which owns its state) and return its
        result."""
        assert self._loop is not None, "start() the proxy first"
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result(10)

    @contextlib.contextmanager
    def fault(self, mode: str) -> Iterator[None]:
        """``with proxy.fault("stall"): ...``, back to ``pass`` afterwards."""
        self.mode = mode
        try:
            yield
        finally:
            self.mode = "pass"

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._mode_changed = asyncio.Event()
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                self._abort(writer)
            await asyncio.sleep(0.05)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the proxy, on its loop -----------------------------------------------------

    def _abort(self, writer: asyncio.StreamWriter) -> None:
        self._writers.discard(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                # Linger 0: close sends RST, as a dropped connection does.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        self.aborted += 1

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._mode == "drop":
            self._abort(c_writer)
            return
        self._writers.add(c_writer)
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._abort(c_writer)
            return
        self._writers.add(s_writer)
        link = _Link()
        self._links.add(link)
        pumps = [
            asyncio.ensure_future(self._pump(c_reader, s_writer, "up", link)),
            asyncio.ensure_future(self._pump(s_reader, c_writer, "down", link)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the proxy is stopping
        finally:
            self._links.discard(link)
            for pump in pumps:
                pump.cancel()
            for writer in (c_writer, s_writer):
                if writer in self._writers:
                    self._writers.discard(writer)
                    with contextlib.suppress(Exception):
                        writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
        link: _Link,
    ) -> None:
        while True:
            try:
                chunk = await reader.read(65536)
            except (ConnectionError, OSError):
                return
            if not chunk:
                return
            while True:
                mode = self._mode
                if link.dead or (link.silent and direction == "down"):
                    chunk = b""  # swallowed for good
                    break
                if mode == "half_open" and direction == "down":
                    link.dead = True
                    chunk = b""
                    break
                if mode == "stall":
                    assert self._mode_changed is not None
                    await self._mode_changed.wait()
                    continue
                if mode == "slow":
                    await asyncio.sleep(self.delay)
                break
            if not chunk:
                continue
            if writer not in self._writers:
                return
            try:
                writer.write(chunk)
                await writer.drain()
            except (ConnectionError, OSError):
                return
