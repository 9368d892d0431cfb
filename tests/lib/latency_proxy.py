"""User-space TCP proxy that adds a fixed one-way delay, for benchmarks.

Test-only, controller side: used to put simulated network latency between
the controller and a local testbed sshd (see :mod:`tests.lib.testbed`).

Every chunk read from one side at time ``t`` is written to the other side at
``t + delay``, in both directions, so an application-level round trip costs at
least ``2 * delay``.  Chunks are queued with their deadline and a per-direction
writer waits only for the *head* of the queue, so several chunks can be in
flight at once and throughput is not divided by the delay (no serial
``sleep(delay)`` per chunk).  Byte order per direction is preserved; a
half-close (EOF) is forwarded after the same delay.

Not simulated: bandwidth limits, packet loss, and the extra round trip of the
TCP handshake (the client's ``connect()`` completes immediately against the
proxy; the upstream connection is opened straight away).

Usage::

    with LatencyProxy(target=(host.address, host.port), delay=0.010) as proxy:
        addr, port = proxy.address
        ...

The event loop runs in a private daemon thread; every wait in ``start()`` and
``stop()`` is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from types import TracebackType

__all__ = ["LatencyProxy", "ProxyStats"]

_EOF = b""
_CHUNK = 256 * 1024
#: Max chunks queued per direction before reading from the source pauses
#: (TCP back-pressure then slows the sender down).
_QUEUE_CHUNKS = 256


@dataclasses.dataclass
class ProxyStats:
    """Test-only, controller side: counters of a :class:`LatencyProxy`."""

    connections_total: int = 0
    connections_active: int = 0
    connect_failures: int = 0
    bytes_upstream: int = 0
    bytes_downstream: int = 0


class LatencyProxy:
    """Test-only, controller side: TCP forwarder adding ``delay`` each way.

    ``listen`` is the local bind address (port 0 picks a free port; read the
    real one from :attr:`address` after :meth:`start`); ``target`` is where
    accepted connections are forwarded to.  ``delay`` is the one-way delay in
    seconds (round trip = ``2 * delay``).
    """

    def __init__(
        self,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        target: tuple[str, int] = ("127.0.0.1", 22),
        delay: float = 0.010,
        *,
        connect_timeout: float = 5.0,
    ) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay!r}")
        self.listen = listen
        self.target = target
        self.delay = float(delay)
        self.connect_timeout = connect_timeout
        self.stats = ProxyStats()
        self._address: tuple[str, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._stopping = asyncio.Event()
        self._start_error: BaseException | None = None

    def __repr__(self) -> str:
        return (
            f"<LatencyProxy {self._address or self.listen} -> "
            f"{self.target[0]}:{self.target[1]} delay={self.delay}s>"
        )

    # -- public API --------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` the proxy actually listens on."""
        if self._address is None:
            raise RuntimeError("LatencyProxy is not started")
        return self._address

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 5.0) -> LatencyProxy:
        """Start listening (bounded wait); returns ``self``."""
        if self._thread is not None:
            raise RuntimeError("LatencyProxy already started")
        self._ready.clear()
        self._stopping = asyncio.Event()  # binds to the new loop lazily
        self._start_error = None
        self.stats = ProxyStats()
        self._thread = threading.Thread(
            target=self._thread_main,
            name=f"LatencyProxy-{self.listen[0]}:{self.listen[1]}",
            daemon=True,
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"{self!r} did not start within {timeout}s")
        if self._start_error is not None:
            error = self._start_error
            self.stop()
            raise error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and all connections, join the thread. Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._begin_shutdown)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"{self!r} thread did not stop within {timeout}s")
        self._thread = None
        self._loop = None
        self._address = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- event loop thread -------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._start_error = exc
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.listen[0], self.listen[1],
            reuse_address=True, backlog=512,
        )
        sockname = self._server.sockets[0].getsockname()
        self._address = (sockname[0], int(sockname[1]))
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)
            await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)

    def _begin_shutdown(self) -> None:
        self._stopping.set()

    async def _handle(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        self.stats.connections_total += 1
        self.stats.connections_active += 1
        upstream_w: asyncio.StreamWriter | None = None
        try:
            try:
                upstream_r, upstream = await asyncio.wait_for(
                    asyncio.open_connection(*self.target),
                    timeout=self.connect_timeout,
                )
            except (OSError, asyncio.TimeoutError):
                self.stats.connect_failures += 1
                return
            upstream_w = upstream
            self._writers.add(upstream)
            pumps = [
                asyncio.ensure_future(self._pump(client_r, upstream, True)),
                asyncio.ensure_future(self._pump(upstream_r, client_w, False)),
            ]
            try:
                # A reset on either side ends both directions.
                await asyncio.wait(
                    pumps, return_when=asyncio.FIRST_EXCEPTION
                )
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for writer in (client_w, upstream_w):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.transport.abort()
            self.stats.connections_active -= 1
            self._tasks.discard(task)

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        upstream: bool,
    ) -> None:
        """Move one direction: reader stamps chunks, writer releases them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)

        async def reader() -> None:
            while True:
                data = await src.read(_CHUNK)
                await queue.put((loop.time() + self.delay, data))
                if data == _EOF:
                    return

        async def writer() -> None:
            while True:
                due, data = await queue.get()
                while (remaining := due - loop.time()) > 0:
                    await asyncio.sleep(remaining)
                if data == _EOF:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                if upstream:
                    self.stats.bytes_upstream += len(data)
                else:
                    self.stats.bytes_downstream += len(data)
                await dst.drain()

        read_task = asyncio.ensure_future(reader())
        write_task = asyncio.ensure_future(writer())
        try:
            await asyncio.gather(read_task, write_task)
        finally:
            read_task.cancel()
            write_task.cancel()
            await asyncio.gather(read_task, write_task, return_exceptions=True)
