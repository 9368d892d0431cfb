"""Windowed file streaming: the sender's and the receiver's state machines.

Runs on: controller and targets (shipped). Sans-IO: no files, sockets,
threads, clocks or logging. :mod:`ansible_mitogen_svc.files` drives these
objects with real messages; the unit tests drive them with plain integers.

Theory of operation
-------------------
A transfer moves ``size`` bytes from a sender (``files.FileService``) to a
receiver (``files.get_file``). The bytes are cut into chunks of at most
``chunk_size`` bytes, sent in order, each carrying its offset. The receiver
returns credit with *cumulative* acknowledgements: "I have consumed (written
out) the first N bytes". The sender never has more than ``window`` bytes
sent but not yet acknowledged, so neither side ever buffers more than one
window, however slow the other side or the link between them is.

Normal operation:

1. The receiver allocates a handle for data and asks for the file. The
   sender opens it, takes ``size`` from ``fstat`` (bytes appended later are
   not sent), builds ``SenderState(size)`` and replies with the metadata
   (size, window, the handle acknowledgements go to). The receiver builds
   ``ReceiverState(size, window)``.
2. The sender calls :meth:`SenderState.next_chunk` and sends the
   ``(offset, length)`` it gets, until it gets None: the window is full, or
   every byte has been handed out.
3. For every chunk the receiver calls :meth:`ReceiverState.on_chunk`, which
   checks the offset is exactly the number of bytes received so far, that
   the chunk does not run past ``size`` and that the sender kept within
   the window; the receiver then writes the data. When ``on_chunk`` returns
   a number N the receiver sends the acknowledgement N. That happens once
   ``ack_every`` (half a window) bytes arrived since the last one, and
   always for the last byte.
4. The sender feeds each acknowledgement to :meth:`SenderState.on_ack`
   (it must not go backwards nor cover bytes never sent), which frees
   credit, and goes back to step 2.
5. Once every byte has been handed out, :meth:`SenderState.take_end`
   returns True, once: the sender sends an end marker carrying ``size``
   and waits for the final acknowledgement (state DRAINING).
6. The receiver passes the end marker to :meth:`ReceiverState.on_end`,
   which checks that exactly ``size`` bytes arrived (COMPLETE).
7. The final acknowledgement (N == size) moves the sender to DONE; it then
   releases the file and its handles. An empty file goes straight from
   step 5 to DONE: there is nothing to acknowledge.

Shutdown and abort:

1. A state machine that sees a rule broken raises
   :class:`~ansible_mitogen_svc.errors.LocalProtocolError` naming the rule
   and the numbers; it is then FAILED (receiver) or ABORTED (sender), and
   the receiver raises the same error again on every later call.
2. The sender gives up (read error, the file shrank, no acknowledgement
   for its idle timeout, service shutdown) by calling
   :meth:`SenderState.abort`, sending the receiver an error marker and
   releasing the file; acknowledgements still in flight are ignored.
3. The receiver gives up (a bad chunk, a write error, its own timeout, its
   caller was interrupted) by sending an abort message to the sender's
   acknowledgement handle; the sender then does step 2 without the error
   marker.
4. When the receiver's context dies, the sender learns it from the router:
   a DEAD notice to its acknowledgement handle (registered with the
   receiver as respondent), or a bounced chunk. Step 2 again.
5. When the sender's context dies the receiver gets a DEAD notice on its
   data handle and raises BrokenError; a receiver that hears nothing at
   all raises TimeoutError after its timeout.
"""
from __future__ import annotations

from typing import NoReturn, Optional, Tuple

from .errors import LocalProtocolError

__all__ = ["CHUNK_SIZE", "WINDOW", "MAX_WINDOW", "SenderState", "ReceiverState",
           "SENDING", "DRAINING", "DONE", "ABORTED", "RECEIVING", "COMPLETE", "FAILED"]

# 128 KiB chunks. Each message costs a 40-byte header, an 8-byte offset and
# ~10-20 us of Python dispatch on each hop, i.e. < 0.1 % of the bytes and
# ~8000 messages/s at 1 GB/s. Bigger chunks save little more but hold the
# stream longer: on a 10 Mbit/s link one 128 KiB chunk already delays any
# other message behind it by ~100 ms. One transport read (256 KiB) takes
# two chunks.
CHUNK_SIZE = 128 * 1024

# One transfer moves at most WINDOW bytes per round trip:
#     4 MiB / 0.1 ms (local)  -> limited by CPU, not the window
#     4 MiB /  10 ms (LAN)    -> 419 MB/s   (>= 400 MB/s)
#     4 MiB /  50 ms (WAN)    ->  84 MB/s
# and buffers at most WINDOW bytes on each side: 100 concurrent transfers
# cost <= 400 MiB in the worst case (a stalled link), which FileService
# caps further with a service-wide budget. A 1 MiB window would only give
# 105 MB/s at 10 ms; 16 MiB would quadruple the worst-case memory to buy
# speed only on links with RTT > 10 ms that are also faster than 400 MB/s.
WINDOW = 4 * 1024 * 1024

# Upper bound on a window a receiver may ask for (64 MiB / 50 ms = 1.3 GB/s).
MAX_WINDOW = 64 * 1024 * 1024

SENDING, DRAINING, DONE, ABORTED = "SENDING", "DRAINING", "DONE", "ABORTED"
RECEIVING, COMPLETE, FAILED = "RECEIVING", "COMPLETE", "FAILED"


def _count(name: str, value: object, minimum: int) -> int:
    if type(value) is not int:
        raise TypeError("%s must be an int, got %s" % (name, type(value).__name__))
    if value < minimum:  # type: ignore[operator]
        raise ValueError("%s must be >= %d, got %d" % (name, minimum, value))
    return value  # type: ignore[return-value]


class SenderState:
    """Which bytes the sender may send now.

    Args:
        size: bytes to send (fixed when the transfer starts).
        chunk_size: largest chunk handed out.
        window: most bytes sent but not acknowledged; >= ``chunk_size``.
        what: names the transfer in error messages.

    States: SENDING -> DRAINING (end marker sent) -> DONE (final ack), and
    from any of them ABORTED.
    """

    def __init__(self, size: int, chunk_size: int = CHUNK_SIZE, window: int = WINDOW,
                 what: str = "transfer") -> None:
        self.size = _count("size", size, 0)
        self.chunk_size = _count("chunk_size", chunk_size, 1)
        self.window = _count("window", window, 1)
        if window < chunk_size:
            raise ValueError("window (%d) must be at least one chunk (%d)" % (window, chunk_size))
        self.what = what
        self.sent = 0      # bytes handed out by next_chunk()
        self.acked = 0     # highest cumulative acknowledgement
        self.state = SENDING
        self.error: Optional[str] = None

    def __repr__(self) -> str:
        return "SenderState(%s, sent=%d, acked=%d, size=%d)" % (
            self.state, self.sent, self.acked, self.size)

    @property
    def in_flight(self) -> int:
        """Bytes sent and not yet acknowledged."""
        return self.sent - self.acked

    @property
    def finished(self) -> bool:
        """DONE or ABORTED: nothing more will be sent."""
        return self.state in (DONE, ABORTED)

    def wants(self) -> int:
        """Length of the chunk the window allows now, 0 for none."""
        if self.state != SENDING or self.sent >= self.size:
            return 0
        length = min(self.chunk_size, self.size - self.sent)
        if self.in_flight + length > self.window:
            return 0
        return length

    def next_chunk(self, limit: Optional[int] = None) -> Optional[Tuple[int, int]]:
        """Hand out the next ``(offset, length)`` to send, or None when the
        window is full, everything was handed out, or the chunk would be
        longer than ``limit`` (a budget shared with other transfers). The
        caller must send it: it counts as sent from now on."""
        length = self.wants()
        if not length or (limit is not None and length > limit):
            return None
        offset = self.sent
        self.sent += length
        return offset, length

    def take_end(self) -> bool:
        """True exactly once, when every byte has been handed out: the
        caller must now send the end marker. Moves to DRAINING, or straight
        to DONE when nothing is left unacknowledged (an empty file)."""
        if self.state != SENDING or self.sent < self.size:
            return False
        self.state = DONE if self.acked == self.size else DRAINING
        return True

    def on_ack(self, acked: object) -> int:
        """Apply a cumulative acknowledgement; returns the bytes of credit
        it freed. Ignored (returns 0) once ABORTED.

        Raises:
            LocalProtocolError: not an int, going backwards, or covering
                bytes never sent. The state is then ABORTED.
        """
        if self.state == ABORTED:
            return 0
        if type(acked) is not int:
            self._fail("acknowledgement is %s, not an int" % type(acked).__name__)
        if acked < self.acked:
            self._fail("acknowledgement went backwards from %d to %d" % (self.acked, acked))
        if acked > self.sent:
            self._fail("acknowledgement of %d bytes, but only %d were sent" % (acked, self.sent))
        freed = acked - self.acked
        self.acked = acked
        if self.state == DRAINING and acked == self.size:
            self.state = DONE
        return freed

    def abort(self, reason: str) -> None:
        """Stop: nothing more is handed out and later acks are ignored. A
        finished (DONE) transfer stays DONE."""
        if self.state != DONE:
            if self.state != ABORTED:
                self.error = reason
            self.state = ABORTED

    def _fail(self, reason: str) -> NoReturn:
        self.abort(reason)
        raise LocalProtocolError("%s: %s" % (self.what, reason))


class ReceiverState:
    """Checks what arrives and decides when to acknowledge.

    Args:
        expected_size: the size announced by the sender.
        window: the sender's window; a sender that exceeds it is broken.
        ack_every: acknowledge once this many bytes arrived since the last
            acknowledgement (default: half the window, so the sender gets
            credit back while it still has half a window to send).
        what: names the transfer in error messages.

    States: RECEIVING -> COMPLETE (end marker checked) or FAILED.
    """

    def __init__(self, expected_size: int, window: int = WINDOW,
                 ack_every: Optional[int] = None, what: str = "transfer") -> None:
        self.expected_size = _count("expected_size", expected_size, 0)
        self.window = _count("window", window, 1)
        if ack_every is None:
            ack_every = max(1, window // 2)
        self.ack_every = _count("ack_every", ack_every, 1)
        if ack_every > window:
            raise ValueError("ack_every (%d) must not exceed the window (%d)" % (ack_every, window))
        self.what = what
        self.received = 0   # bytes accepted so far
        self.acked = 0      # last acknowledgement handed out
        self.state = RECEIVING
        self.error: Optional[LocalProtocolError] = None

    def __repr__(self) -> str:
        return "ReceiverState(%s, received=%d, acked=%d, expected=%d)" % (
            self.state, self.received, self.acked, self.expected_size)

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE

    def on_chunk(self, offset: object, length: object) -> Optional[int]:
        """Accept the chunk ``[offset, offset + length)`` (call it *before*
        writing the data, and write it before sending the acknowledgement).
        Returns the cumulative acknowledgement to send now, or None.

        Raises:
            LocalProtocolError: the chunk is empty, out of order (a gap or
                a repeat), runs past the expected size, exceeds the window,
                or arrives after the end marker. The state is then FAILED.
        """
        self._check_open("chunk")
        if type(offset) is not int or type(length) is not int:
            self._fail("chunk offset/length must be ints")
        if length <= 0:
            self._fail("empty chunk at offset %d" % offset)
        if offset != self.received:
            self._fail("out-of-order chunk at offset %d, expected offset %d"
                       % (offset, self.received))
        end = offset + length
        if end > self.expected_size:
            self._fail("overrun: chunk [%d, %d) runs past the expected size of %d bytes"
                       % (offset, end, self.expected_size))
        if end - self.acked > self.window:
            self._fail("sender exceeded the window: %d bytes unacknowledged, window %d"
                       % (end - self.acked, self.window))
        self.received = end
        if end - self.acked >= self.ack_every or end == self.expected_size:
            self.acked = end
            return end
        return None

    def on_end(self, size: object) -> None:
        """The end marker arrived announcing ``size`` bytes in total.

        Raises:
            LocalProtocolError: the announced size differs from the
                expected one, or fewer bytes arrived ("short file").
        """
        self._check_open("end marker")
        if type(size) is not int:
            self._fail("end marker carries %s, not an int" % type(size).__name__)
        if size < self.expected_size:
            self._fail("short file: sender ended at %d of the %d bytes announced"
                       % (size, self.expected_size))
        if size > self.expected_size:
            self._fail("overrun: sender ended at %d bytes, %d were announced"
                       % (size, self.expected_size))
        if self.received != size:
            self._fail("short file: end marker after %d of %d bytes" % (self.received, size))
        self.state = COMPLETE

    def fail(self, reason: str) -> LocalProtocolError:
        """Mark the transfer FAILED for an outside reason; returns the error
        (which later calls raise)."""
        if self.error is None:
            self.error = LocalProtocolError("%s: %s" % (self.what, reason))
            self.state = FAILED
        return self.error

    def _check_open(self, what: str) -> None:
        if self.error is not None:
            raise self.error
        if self.state == COMPLETE:
            self._fail("%s after the end marker" % what)

    def _fail(self, reason: str) -> NoReturn:
        raise self.fail(reason)
