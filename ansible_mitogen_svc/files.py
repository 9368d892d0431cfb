"""FileService: stream registered files to the contexts that ask for them.

Runs on: controller (the usual host of the service) and targets (shipped:
agents run :func:`get_file`, and may host a FileService of their own).

Theory of operation
-------------------
The controller registers what may be served: single files with
:meth:`FileService.register` and whole directory trees with
:meth:`FileService.register_prefix`. Both store ``os.path.realpath`` of the
path, and a request is served only if the realpath of the requested path
equals a registered file or lies strictly under a registered prefix, so
``..`` components and symlinks cannot reach anything else. On Linux the
opened file is checked again through ``/proc/self/fd``, closing the window
between the check and the open.

A receiver (normally :func:`get_file` inside an agent) allocates a data
handle and calls ``fetch(path, handle)``. The pool thread serving the call
only checks the path, opens the file, registers an acknowledgement handle
and replies with the metadata; it never waits for the transfer. From then
on everything happens on the broker thread, driven by messages, following
the numbered steps in :mod:`ansible_mitogen_svc.transfer`:

* chunks are read with ``os.pread`` only when there is credit for them and
  sent as FLAG_RAW messages: an 8-byte big-endian offset then the data;
* the receiver sends ``{"ack": n}`` to the acknowledgement handle, which
  frees credit and sends the next chunks;
* after the last chunk comes ``{"end": size}``; a failure on the sender's
  side is reported as ``{"error": {"type", "message"}}``; the receiver can
  send ``{"abort": reason}``.

Memory: every transfer has at most one window (4 MiB) read but not
acknowledged, and all transfers of one service together at most
MAX_IN_FLIGHT bytes, so 100 hosts pulling the same large file cost
min(100 x 4 MiB, 64 MiB) of buffers on the serving side; the file itself
is only ever in the page cache. With the budget spent, a transfer waits
(in a queue, first come first served) until acknowledgements of any
transfer refund some. A chunk is read on the broker thread: ~20 us for
128 KiB from the page cache; a cold read costs one disk access. A chunk is sent with the
acknowledgement handle as ``reply_to``, so a router that cannot deliver it
(the receiver died further down the tree) bounces a DEAD notice there.

Cleanup: a transfer ends (its fd closed, its handle removed, its budget
refunded) on the final acknowledgement, on an abort from the receiver, on
a DEAD notice about the receiver's context, on a read error, when no
acknowledgement arrives within its idle timeout, or when the pool stops.
"""
from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import stat
import struct
import threading
import time
from typing import IO, Any, Deque, Dict, Optional, Set, Tuple, Union

from .context import Context, Receiver, Router, decode_reply
from .errors import (CallError, Error, LocalProtocolError, RefusedError,
                     TimeoutError)
from .policy import AllowAny, AllowParents, Caller
from .service import Service, arg_spec, current_call, expose
from .transfer import CHUNK_SIZE, DONE, MAX_WINDOW, WINDOW, ReceiverState, SenderState
from .wire import FIRST_DYNAMIC_HANDLE, FLAG_DEAD, FLAG_RAW, MAX_HANDLE, Message

__all__ = ["FileService", "get_file", "SERVICE_NAME", "DEFAULT_TIMEOUT", "MAX_IN_FLIGHT"]

LOG = logging.getLogger("ansible_mitogen_svc.files")

SERVICE_NAME = "ansible_mitogen_svc.files.FileService"

# Bytes read but not yet acknowledged, summed over all transfers of one
# service: 16 windows. 100 transfers then share 64 MiB instead of holding
# 400 MiB, and still get 64 MiB / 10 ms = 6.7 GB/s together, more than one
# broker thread can push.
MAX_IN_FLIGHT = 64 * 1024 * 1024

# Longest silence tolerated (seconds) on either side of a transfer: a
# receiver waiting for the next message, a sender waiting for an
# acknowledgement. A dead peer is noticed at once through DEAD notices;
# this only catches a peer that is alive but stuck.
DEFAULT_TIMEOUT = 300.0
MAX_TIMEOUT = 3600.0
# How often (seconds) the sender looks for idle transfers while any exist:
# one timer per service, not one per transfer.
SWEEP_INTERVAL = 1.0

_OFFSET = struct.Struct(">Q")


class _Refused(Exception):
    pass


class _Transfer:
    """One file being sent to one receiver. Touched on the broker thread
    only, except that the pool thread creates it."""

    __slots__ = ("id", "path", "fd", "state", "receiver", "data_handle", "ack_handle",
                 "charged", "last_progress", "idle_timeout", "starved", "closed")

    def __init__(self, ident: int, path: str, fd: int, state: SenderState, receiver: int,
                 data_handle: int, idle_timeout: float) -> None:
        self.id = ident
        self.path = path
        self.fd = fd
        self.state = state
        self.receiver = receiver
        self.data_handle = data_handle
        self.ack_handle = 0
        self.charged = 0          # bytes of the service budget this transfer holds
        self.last_progress = time.monotonic()
        self.idle_timeout = idle_timeout
        self.starved = False      # queued waiting for budget
        self.closed = False


class FileService(Service):
    """Serves registered files to any context that asks (see the module
    docstring). Construct it yourself to change the limits:
    ``Pool(router, [FileService(router, max_in_flight=...)])``.

    Args:
        router: this context's router.
        window: per-transfer window in bytes (receivers may ask for less).
        chunk_size: bytes per data message.
        max_in_flight: budget shared by all transfers; >= one window.
    """

    name = SERVICE_NAME

    def __init__(self, router: Router, window: int = WINDOW, chunk_size: int = CHUNK_SIZE,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        super().__init__(router)
        SenderState(0, chunk_size, window)  # validates the numbers
        if window > MAX_WINDOW:
            raise ValueError("window (%d) exceeds MAX_WINDOW (%d)" % (window, MAX_WINDOW))
        if max_in_flight < window:
            raise ValueError("max_in_flight (%d) must be at least one window (%d)"
                             % (max_in_flight, window))
        self.window = window
        self.chunk_size = chunk_size
        self.max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._paths: Set[str] = set()
        self._prefixes: Set[str] = set()
        self._transfers: Dict[int, _Transfer] = {}
        self._ids = itertools.count(1)
        # Broker thread only:
        self._budget = max_in_flight
        self._starved: Deque[_Transfer] = collections.deque()
        self._sweeping = False
        # Counters (written on the broker thread, read anywhere):
        self.started = 0
        self.completed = 0
        self.aborted = 0
        self.bytes_sent = 0

    # -- registration -------------------------------------------------------------
    @expose(AllowParents())
    @arg_spec({"path": str})
    def register(self, path: str) -> str:
        """Allow ``path`` (one file) to be fetched; returns its realpath."""
        real = _canonical(path)
        with self._lock:
            self._paths.add(real)
        return real

    @expose(AllowParents())
    @arg_spec({"path": str})
    def register_prefix(self, path: str) -> str:
        """Allow every file under the directory ``path`` to be fetched;
        returns its realpath."""
        real = _canonical(path)
        with self._lock:
            self._prefixes.add(real)
        return real

    def _allowed(self, real: str) -> bool:
        with self._lock:
            if real in self._paths:
                return True
            for prefix in self._prefixes:
                if real.startswith(prefix if prefix.endswith(os.sep) else prefix + os.sep):
                    return True
        return False

    # -- fetch (pool thread) ------------------------------------------------------
    @expose(AllowAny())
    @arg_spec({"path": str, "handle": int, "timeout": (int, float), "window": int})
    def fetch(self, path: str, handle: int, timeout: float = DEFAULT_TIMEOUT,
              window: int = 0) -> Optional[Dict[str, Any]]:
        """Stream the registered file ``path`` to ``handle`` in the caller's
        context. Replies with ``{"size", "mode", "mtime", "atime", "uid",
        "gid", "path", "window", "chunk_size", "ack_handle", "transfer_id"}``
        before the first chunk; then the data follows as described in the
        module docstring. ``timeout``: seconds without an acknowledgement
        before the transfer is dropped; ``window``: a smaller window than
        the service's (0: the service's).

        Refused (RefusedError naming the path) unless the path is
        registered; other failures (missing file, a directory, permission
        denied) raise the OSError.
        """
        info = current_call()
        caller = info.caller
        try:
            if not FIRST_DYNAMIC_HANDLE <= handle <= MAX_HANDLE:
                raise _Refused("handle %d is not a dynamic handle" % handle)
            fd, real = self._open(path)
        except _Refused as exc:
            # Replied to by hand: only then does the caller get a RefusedError.
            LOG.info("%s: refused fetch of %r by context %d: %s", self.router.name, path,
                     caller.context_id, exc)
            info.defer_reply().fail(RefusedError.make(self.name, "fetch", str(exc)),
                                    refused=True)
            return None
        try:
            st = os.fstat(fd)
            win = self.window if window <= 0 else max(self.chunk_size, min(window, self.window))
            timeout = min(max(float(timeout), 1.0), MAX_TIMEOUT)
            ident = next(self._ids)
            t = _Transfer(ident, path, fd, SenderState(
                st.st_size, self.chunk_size, win, what="send of %r to context %d"
                % (path, caller.context_id)), caller.context_id, handle, timeout)

            def on_ack(msg: Message, c: Caller) -> None:
                self._on_ack(t, msg, c)
            t.ack_handle = self.router.add_handler(on_ack, respondent=caller.context_id)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            self._transfers[ident] = t
        meta = {"size": st.st_size, "mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime,
                "atime": st.st_atime, "uid": st.st_uid, "gid": st.st_gid, "path": path,
                "window": win, "chunk_size": self.chunk_size, "ack_handle": t.ack_handle,
                "transfer_id": ident}
        # Reply first, then start streaming from the broker thread: the
        # metadata always precedes the first chunk on the wire.
        info.defer_reply().send(meta)
        self.router.broker.defer(self._start, t)
        return None

    def _open(self, path: str) -> Tuple[int, str]:
        """Check ``path`` and open it; returns (fd, realpath). Raises
        _Refused for anything not registered, OSError otherwise."""
        if "\0" in path or not os.path.isabs(path):
            raise _Refused("path %r is not an absolute path" % (path,))
        real = os.path.realpath(path)
        if not self._allowed(real):
            raise _Refused("path %r is not a registered file or under a registered prefix"
                           % (path,))
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | \
            getattr(os, "O_NONBLOCK", 0)  # never hang opening a FIFO
        try:
            fd = os.open(real, flags)
        except OSError as exc:
            raise type(exc)(exc.errno, exc.strerror, path) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
                              "not a regular file", path)
            # The path may have been swapped (a symlink planted in a parent
            # directory) between realpath() and open(): check what we got.
            try:
                actual = os.readlink("/proc/self/fd/%d" % fd)
            except OSError:
                actual = None  # no /proc (macOS): the realpath check stands
            if actual is not None and actual.startswith(os.sep) and not self._allowed(actual):
                raise _Refused("path %r changed while being opened" % (path,))
        except BaseException:
            os.close(fd)
            raise
        return fd, real

    # -- streaming (broker thread) -----------------------------------------------
    def _start(self, t: _Transfer) -> None:
        if t.closed:
            return
        self.started += 1
        if not self._sweeping:
            self._sweeping = True
            self.router.broker.call_later(SWEEP_INTERVAL, self._sweep)
        self._pump(t)

    def _pump(self, t: _Transfer) -> None:
        """Send every chunk the window and the budget allow now."""
        st = t.state
        while not t.closed:
            chunk = st.next_chunk(self._budget)
            if chunk is None:
                break
            offset, length = chunk
            self._budget -= length
            t.charged += length
            try:
                data = os.pread(t.fd, length, offset)
            except OSError as exc:
                self._abort(t, exc, notify=True)
                return
            if len(data) != length:
                self._abort(t, OSError("%r shrank while being sent: %d bytes at offset %d, "
                                       "expected %d" % (t.path, len(data), offset, length)),
                            notify=True)
                return
            if not self._send(t, t.data_handle, _OFFSET.pack(offset) + data, FLAG_RAW):
                return
            self.bytes_sent += length
            t.last_progress = time.monotonic()
        if t.closed:
            return
        if st.wants() and not t.starved:
            t.starved = True
            self._starved.append(t)
        if st.take_end():
            if not self._send(t, t.data_handle, {"end": st.size}):
                return
            if st.state == DONE:
                self._finish(t)

    def _pump_starved(self) -> None:
        while self._starved and self._budget > 0:
            t = self._starved.popleft()
            t.starved = False
            if t.closed:
                continue
            self._pump(t)
            if t.starved:
                break  # the budget ran out again

    def _send(self, t: _Transfer, handle: int, body: Any, flags: int = 0) -> bool:
        """Send to the receiver; False (and the transfer closed) if that
        failed. ``reply_to`` makes routers bounce undeliverable chunks
        back to the acknowledgement handle as DEAD notices."""
        try:
            if flags & FLAG_RAW:
                msg = Message(t.receiver, self.router.my_id, self.router.my_id, handle,
                              t.ack_handle, flags, body)
            else:
                msg = Message.encoded(t.receiver, self.router.my_id, handle, body,
                                      reply_to=t.ack_handle)
            self.router.send(msg)
        except Error as exc:
            self._abort(t, exc, notify=False)
            return False
        return not t.closed  # a bounce may have closed it synchronously

    def _on_ack(self, t: _Transfer, msg: Message, caller: Caller) -> None:
        if t.closed:
            return
        if msg.flags & FLAG_DEAD:
            try:
                reason = msg.data().get("reason", "?")
            except Exception:
                reason = "?"
            self._abort(t, "receiver context %d is gone: %s" % (t.receiver, reason),
                        notify=False)
            self._pump_starved()
            return
        if msg.src != t.receiver:
            LOG.warning("%s: ignoring message from context %d for transfer %d of %r",
                        self.router.name, msg.src, t.id, t.path)
            return
        try:
            body = msg.data()
            if not isinstance(body, dict):
                raise LocalProtocolError("acknowledgement body is %s" % type(body).__name__)
            if "abort" in body:
                self._abort(t, "receiver aborted: %s" % (body.get("abort"),), notify=False)
                self._pump_starved()
                return
            freed = t.state.on_ack(body.get("ack"))
        except Error as exc:  # LoadError, LocalProtocolError
            self._abort(t, exc, notify=True)
            self._pump_starved()
            return
        t.charged -= freed
        self._budget += freed
        t.last_progress = time.monotonic()
        if t.state.state == DONE:
            self._finish(t)
        elif self._starved and t.state.wants():
            # Others are waiting for budget: queue behind them, or a busy
            # transfer would take back every byte it frees.
            if not t.starved:
                t.starved = True
                self._starved.append(t)
        else:
            self._pump(t)
        self._pump_starved()

    def _sweep(self) -> None:
        """Drop transfers whose receiver stopped acknowledging (a transfer
        waiting for budget is not the receiver's fault)."""
        now = time.monotonic()
        with self._lock:
            transfers = list(self._transfers.values())
        for t in transfers:
            idle = now - t.last_progress
            if not t.closed and not t.starved and idle >= t.idle_timeout:
                self._abort(t, TimeoutError("no acknowledgement from context %d for %.0fs"
                                            % (t.receiver, idle)), notify=True)
        self._pump_starved()
        with self._lock:
            again = bool(self._transfers)
        if again:
            self.router.broker.call_later(SWEEP_INTERVAL, self._sweep)
        else:
            self._sweeping = False

    def _abort(self, t: _Transfer, reason: Union[str, BaseException], notify: bool) -> None:
        if t.closed:
            return
        t.state.abort(str(reason))
        LOG.info("%s: transfer %d of %r to context %d aborted: %s", self.router.name,
                 t.id, t.path, t.receiver, reason)
        self._release(t)
        self.aborted += 1
        if notify:
            exc = reason if isinstance(reason, BaseException) else RuntimeError(reason)
            err = CallError.from_exception(exc)
            try:
                self.router.send(Message.encoded(
                    t.receiver, self.router.my_id, t.data_handle,
                    {"error": {"type": err.type_name, "message": err.message}}))
            except Error:
                pass

    def _finish(self, t: _Transfer) -> None:
        if not t.closed:
            self._release(t)
            self.completed += 1

    def _release(self, t: _Transfer) -> None:
        t.closed = True
        self._budget += t.charged
        t.charged = 0
        if t.starved:
            t.starved = False
            try:
                self._starved.remove(t)
            except ValueError:
                pass
        self.router.del_handler(t.ack_handle)
        with self._lock:
            self._transfers.pop(t.id, None)
        try:
            os.close(t.fd)
        except OSError:
            pass

    # -- introspection and shutdown -------------------------------------------------
    @expose(AllowParents())
    def statistics(self) -> Dict[str, int]:
        """Counters: ``active`` transfers, ``started``, ``completed``,
        ``aborted``, ``bytes_sent``, ``in_flight`` (budget in use),
        ``starved`` (transfers waiting for budget), registrations."""
        with self._lock:
            active = len(self._transfers)
            paths, prefixes = len(self._paths), len(self._prefixes)
        return {"active": active, "started": self.started, "completed": self.completed,
                "aborted": self.aborted, "bytes_sent": self.bytes_sent,
                "in_flight": self.max_in_flight - self._budget,
                "starved": len(self._starved), "registered_paths": paths,
                "registered_prefixes": prefixes}

    def on_shutdown(self) -> None:
        """Abort every transfer (on the broker thread, so no fd is closed
        under a pread)."""
        def abort_all() -> None:
            with self._lock:
                transfers = list(self._transfers.values())
            for t in transfers:
                self._abort(t, "FileService is shutting down", notify=True)
            self._starved.clear()

        broker = self.router.broker
        if broker.on_broker_thread:
            abort_all()
            return
        done = threading.Event()

        def on_broker() -> None:
            abort_all()
            done.set()
        if broker.alive:
            broker.defer(on_broker)
            if done.wait(5.0):
                return
        abort_all()  # the broker is gone: nothing else touches the fds


def _canonical(path: str) -> str:
    if "\0" in path or not path:
        raise ValueError("bad path %r" % (path,))
    return os.path.realpath(os.path.abspath(path))


# -- receiver side --------------------------------------------------------------------
def get_file(context: Context, path: str, out: Union[str, "os.PathLike[str]", IO[bytes]],
             timeout: float = DEFAULT_TIMEOUT, window: int = 0) -> Dict[str, Any]:
    """Fetch ``path`` from the FileService in ``context`` into ``out`` (a
    path, created or truncated and removed again on failure, or any object
    with ``write(bytes)``). Blocks the calling thread, so never call it on
    a broker thread; inside an agent, ``context`` is usually
    ``current_call().parent``.

    Returns the metadata: ``{"size", "mode", "mtime", "atime", "uid",
    "gid", "path", ...}``.

    Raises:
        RefusedError: the path is not registered there (names the path).
        CallError: the sender failed (e.g. ``builtins.FileNotFoundError``,
            a read error, the file shrank).
        LocalProtocolError: the stream broke the rules (out of order,
            overrun, short file).
        BrokenError / RoutingError: the serving context went away.
        TimeoutError: nothing arrived for ``timeout`` seconds.
    """
    router = context.router
    what = "fetch of %r from %s" % (path, context.name)
    own = not hasattr(out, "write")
    fp: Any = open(out, "wb") if own else out  # type: ignore[arg-type]
    recv = Receiver(router, respondent=context.context_id)
    meta: Optional[Dict[str, Any]] = None
    ok = False
    try:
        meta = context.call_service_async(SERVICE_NAME, "fetch", path=path, handle=recv.handle,
                                          timeout=float(timeout),
                                          window=int(window)).get(timeout)
        if not isinstance(meta, dict):
            raise LocalProtocolError("%s: bad metadata reply %r" % (what, type(meta).__name__))
        state = ReceiverState(int(meta["size"]), window=int(meta["window"]), what=what)
        _receive(router, context.context_id, recv, state, meta, fp, timeout, what)
        ok = True
        return meta
    except BaseException as exc:
        if meta is not None and not ok:
            _send_abort(router, context.context_id, meta, exc)
        raise
    finally:
        recv.close()
        if own:
            fp.close()
            if not ok:
                try:
                    os.unlink(out)  # type: ignore[arg-type]
                except OSError:
                    pass


def _receive(router: Router, sender: int, recv: Receiver, state: ReceiverState,
             meta: Dict[str, Any], fp: Any, timeout: float, what: str) -> None:
    ack_handle = int(meta["ack_handle"])
    while not state.complete:
        try:
            msg = recv.wait(timeout)
        except TimeoutError:
            raise TimeoutError("%s: nothing arrived for %.1fs (%d of %d bytes received)"
                               % (what, timeout, state.received, state.expected_size)) from None
        if msg.flags & FLAG_DEAD:
            decode_reply(msg, what)  # raises BrokenError or RoutingError
            raise state.fail("DEAD notice")  # pragma: no cover - decode_reply raised
        if msg.src != sender:
            LOG.warning("%s: ignoring message from context %d", what, msg.src)
            continue
        if msg.flags & FLAG_RAW:
            body = msg.body
            if len(body) < _OFFSET.size:
                raise state.fail("data message of %d bytes has no offset" % len(body))
            data = memoryview(body)[_OFFSET.size:]
            ack = state.on_chunk(_OFFSET.unpack_from(body)[0], len(data))
            fp.write(data)
            if ack is not None:
                router.send(Message.encoded(sender, router.my_id, ack_handle, {"ack": ack}))
            continue
        body = decode_reply(msg, what)
        if isinstance(body, dict) and "end" in body:
            state.on_end(body["end"])
        elif isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
            raise CallError(str(err.get("type", "?")), "%s: %s" % (what, err.get("message", "")))
        else:
            raise state.fail("unexpected message %r" % (type(body).__name__,))


def _send_abort(router: Router, sender: int, meta: Dict[str, Any], exc: BaseException) -> None:
    try:
        router.send(Message.encoded(sender, router.my_id, int(meta["ack_handle"]),
                                    {"abort": "%s: %s" % (type(exc).__name__, exc)}))
    except Exception:
        pass  # the sender is gone too; its DEAD notice cleans up there
