"""The I/O loop: one thread that moves bytes between fds and protocol
objects.

Runs on: controller and targets (shipped).

Theory of operation
-------------------
A :class:`Broker` owns a selector and a thread. Each :class:`Stream` pairs a
transport with a :class:`~ansible_mitogen_svc.protocol.FrameReader`.

* Reading happens only on the broker thread. Every complete frame is handed
  to ``on_message(stream, msg)``, also on the broker thread, so handlers
  must be quick (queue work for a pool thread instead of blocking).
* Writing can happen from any thread: :meth:`Stream.send` writes straight
  to the fd while nothing is queued (no thread hop on the hot path), and
  queues the rest for the broker thread to flush when the fd is writable.
* A stream ends on EOF, a read/write error or a protocol error; then
  ``on_disconnect(stream, exc)`` runs once on the broker thread, the fds are
  closed and a child process, if any, is reaped (SIGTERM after
  REAP_GRACE seconds, SIGKILL after twice that).
* Other threads run code on the broker thread with :meth:`Broker.defer`
  and schedule timers with :meth:`Broker.call_later`.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Deque, List, Optional, Tuple

from .errors import BrokenError, ClosedError, LocalProtocolError, TimeoutError
from .protocol import DEFAULT_MAX_BODY, EOF, NEED_DATA, FrameReader
from .transport import FdTransport
from .wire import Message

__all__ = ["Broker", "Stream", "REAP_GRACE"]

LOG = logging.getLogger("ansible_mitogen_svc.broker")
IOLOG = logging.getLogger("ansible_mitogen_svc.broker.io")

# A child whose stdin closed gets this long to exit on its own before
# SIGTERM (then as long again before SIGKILL). Agents exit in milliseconds.
REAP_GRACE = 3.0


class Stream:
    """One framed connection to a peer context.

    Args:
        broker: the broker that polls it.
        transport: the fds (and process) behind it.
        name: for logs and errors, e.g. ``ssh.host1`` or ``local.4711``.
        max_body: frame size limit enforced on *incoming* frames.
    """

    _ids = itertools.count(1)

    def __init__(self, broker: "Broker", transport: FdTransport, name: str,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        self.id = next(Stream._ids)
        self.broker = broker
        self.transport = transport
        self.name = name
        self.reader = FrameReader(max_body, name)
        self.on_message: Callable[["Stream", Message], None] = lambda s, m: None
        self.on_disconnect: Callable[["Stream", Optional[BaseException]], None] = lambda s, e: None
        #: When set, bytes read are passed to it unframed (diagnostic
        #: streams: an agent's stderr or pty) instead of the FrameReader.
        self.raw_sink: Optional[Callable[[bytes], None]] = None
        self._lock = threading.Lock()
        self._out: Deque[memoryview] = collections.deque()
        self.pending_bytes = 0
        self.closed = False
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        return "Stream(%d, %r)" % (self.id, self.name)

    def send(self, msg: Message) -> None:
        """Queue one message; thread-safe. Raises ClosedError once closed."""
        data = msg.pack()
        if IOLOG.isEnabledFor(logging.DEBUG):
            IOLOG.debug("%r: send %r", self, msg)
        with self._lock:
            if self.closed:
                raise ClosedError("stream %r is closed" % self.name)
            self.messages_out += 1
            self.bytes_out += len(data)
            if not self._out:
                try:
                    n = self.transport.write(data)
                except OSError as exc:
                    self.broker.defer(self.broker._disconnect, self, exc)
                    return
                if n == len(data):
                    return
                data = data[n:]
                self._out.append(memoryview(data))
                self.pending_bytes += len(data)
                self.broker.defer(self.broker._want_write, self)
            else:
                self._out.append(memoryview(data))
                self.pending_bytes += len(data)

    def _flush(self) -> bool:
        """Write queued bytes (broker thread). True when the queue is empty."""
        with self._lock:
            while self._out:
                buf = self._out[0]
                n = self.transport.write(buf)
                if n == 0:
                    return False
                self.pending_bytes -= n
                if n == len(buf):
                    self._out.popleft()
                else:
                    self._out[0] = buf[n:]
            return True


class Broker:
    """Poll loop thread. Start with :meth:`start`, stop with
    :meth:`shutdown` then :meth:`join`."""

    def __init__(self, name: str = "broker") -> None:
        self.name = name
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._deferred: Deque[Tuple[Callable[..., Any], tuple]] = collections.deque()
        self._timers: List[Tuple[float, int, Callable[[], Any]]] = []
        self._timer_seq = itertools.count()
        self._streams: dict = {}
        self._reaping: List[Tuple[float, subprocess.Popen, int]] = []
        self._running = True
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.on_shutdown: List[Callable[[], None]] = []

    # -- thread-safe API -----------------------------------------------------
    def start(self) -> "Broker":
        self._thread.start()
        return self

    @property
    def on_broker_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def defer(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the broker thread soon."""
        self._deferred.append((fn, args))
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # pipe full means a wake-up is already pending

    def call_later(self, delay: float, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` on the broker thread after ``delay`` seconds."""
        self.defer(self._add_timer, time.monotonic() + delay, fn)

    def add_stream(self, stream: Stream) -> None:
        self.defer(self._add_stream, stream)

    def close_stream(self, stream: Stream, exc: Optional[BaseException] = None) -> None:
        self.defer(self._disconnect, stream, exc)

    def shutdown(self) -> None:
        """Close every stream, reap children, then stop the thread."""
        self.defer(self._begin_shutdown)

    def join(self, timeout: float = 10.0) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("broker %r did not stop within %.1fs" % (self.name, timeout))
        self._cleanup_fds()

    def wait_stopped(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for the thread to end; True once
        it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- broker thread ---------------------------------------------------------
    def _add_timer(self, when: float, fn: Callable[[], Any]) -> None:
        heapq.heappush(self._timers, (when, next(self._timer_seq), fn))

    def _add_stream(self, stream: Stream) -> None:
        if self._stopping:
            self._disconnect(stream, ClosedError("broker is shutting down"))
            return
        self._streams[stream.id] = stream
        self._sel.register(stream.transport.rfd, selectors.EVENT_READ, stream)
        self._want_write(stream)

    def _want_write(self, stream: Stream) -> None:
        if stream.closed or stream.id not in self._streams:
            return
        t = stream.transport
        if t.wfd == t.rfd:
            events = selectors.EVENT_READ
            if stream._out:
                events |= selectors.EVENT_WRITE
            self._sel.modify(t.rfd, events, stream)
        elif stream._out:
            try:
                self._sel.register(t.wfd, selectors.EVENT_WRITE, stream)
            except KeyError:
                pass

    def _on_writable(self, stream: Stream) -> None:
        try:
            done = stream._flush()
        except OSError as exc:
            self._disconnect(stream, exc)
            return
        if done:
            t = stream.transport
            if t.wfd == t.rfd:
                self._sel.modify(t.rfd, selectors.EVENT_READ, stream)
            else:
                try:
                    self._sel.unregister(t.wfd)
                except KeyError:
                    pass
            if self._stopping and not stream._out:
                self._disconnect(stream, None)

    def _on_readable(self, stream: Stream) -> None:
        try:
            data = stream.transport.read()
        except BlockingIOError:
            return
        except OSError as exc:
            self._disconnect(stream, exc)
            return
        stream.bytes_in += len(data)
        if stream.raw_sink is not None:
            if data:
                stream.raw_sink(data)
            else:
                self._disconnect(stream, None)
            return
        reader = stream.reader
        try:
            reader.receive_data(data)
            while not stream.closed:
                event = reader.next_event()
                if event is NEED_DATA:
                    break
                if event is EOF:
                    self._disconnect(stream, None)
                    break
                stream.messages_in += 1
                if IOLOG.isEnabledFor(logging.DEBUG):
                    IOLOG.debug("%r: recv %r", stream, event)
                stream.on_message(stream, event)  # type: ignore[arg-type]
        except LocalProtocolError as exc:
            LOG.error("closing %s: %s", stream.name, exc)
            self._disconnect(stream, exc)

    def _disconnect(self, stream: Stream, exc: Optional[BaseException]) -> None:
        with stream._lock:
            if stream.closed:
                return
            stream.closed = True
            stream._out.clear()
            stream.pending_bytes = 0
        t = stream.transport
        for fd in {t.rfd, t.wfd}:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        self._streams.pop(stream.id, None)
        t.close()
        if exc is not None and not isinstance(exc, (BrokenError, ClosedError)):
            err = BrokenError(BrokenError.template.format(name=stream.name, reason=exc))
            err.__cause__ = exc
            exc = err
        LOG.debug("%r disconnected: %s", stream, exc)
        if t.proc is not None:
            self._reaping.append((time.monotonic(), t.proc, 0))
        try:
            stream.on_disconnect(stream, exc)
        except Exception:
            LOG.exception("on_disconnect handler for %r failed", stream)

    def _reap(self) -> None:
        now = time.monotonic()
        keep = []
        for started, proc, signals in self._reaping:
            if proc.poll() is not None:
                continue
            age = now - started
            if signals == 0 and age > REAP_GRACE:
                self._signal(proc, signal.SIGTERM)
                signals = 1
            elif signals == 1 and age > 2 * REAP_GRACE:
                self._signal(proc, signal.SIGKILL)
                signals = 2
            keep.append((started, proc, signals))
        self._reaping = keep

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            proc.send_signal(sig)
        except OSError:
            pass

    def _begin_shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for fn in list(self.on_shutdown):
            try:
                fn()
            except Exception:
                LOG.exception("shutdown hook %r failed", fn)
        for stream in list(self._streams.values()):
            if not stream._out:
                self._disconnect(stream, ClosedError("broker shut down"))
        # Streams with queued output get REAP_GRACE to flush, then go.
        self._add_timer(time.monotonic() + REAP_GRACE, self._force_close)

    def _force_close(self) -> None:
        for stream in list(self._streams.values()):
            self._disconnect(stream, ClosedError("broker shut down"))

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            LOG.exception("broker %r crashed", self.name)
        finally:
            self._running = False
            for stream in list(self._streams.values()):
                self._disconnect(stream, ClosedError("broker stopped"))
            self._final_reap()

    def _final_reap(self) -> None:
        deadline = time.monotonic() + 2 * REAP_GRACE
        for _, proc, _ in self._reaping:
            try:
                proc.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                try:
                    proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    LOG.error("child %d would not die", proc.pid)
        self._reaping = []

    def _loop(self) -> None:
        while True:
            if self._stopping and not self._streams:
                return
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            if self._reaping:
                timeout = 0.05 if timeout is None else min(timeout, 0.05)
            for key, mask in self._sel.select(timeout):
                stream = key.data
                if stream is None:
                    self._drain_wake()
                    continue
                if mask & selectors.EVENT_WRITE and not stream.closed:
                    self._on_writable(stream)
                if mask & selectors.EVENT_READ and not stream.closed:
                    self._on_readable(stream)
            self._run_deferred()
            self._run_timers()
            if self._reaping:
                self._reap()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run_deferred(self) -> None:
        while self._deferred:
            fn, args = self._deferred.popleft()
            try:
                fn(*args)
            except Exception:
                LOG.exception("deferred call %r failed", fn)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:
                LOG.exception("timer %r failed", fn)

    def _cleanup_fds(self) -> None:
        if self._wake_r < 0:
            return
        try:
            self._sel.close()
        except Exception:
            pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
