"""Per-stream framing state: bytes in, messages out.

Runs on: controller and targets (shipped). Sans-IO.

Theory of operation
-------------------
A :class:`FrameReader` is fed whatever bytes arrived on one stream with
:meth:`~FrameReader.receive_data` and hands back complete messages from
:meth:`~FrameReader.next_event`, or :data:`NEED_DATA`. It has three states:

==========  =============================  ==================================
state       on enough bytes                transition
==========  =============================  ==================================
HEADER      40 header bytes parsed         -> BODY (checks magic, version,
                                              flags and length <= limit
                                              *before* buffering the body)
BODY        ``length`` body bytes present  -> HEADER, emits a Message
ERROR       (any)                          stays; every call raises again
==========  =============================  ==================================

``receive_data(b"")`` signals EOF: in HEADER with an empty buffer that is a
clean end (:data:`EOF` is returned once), anywhere else it is a truncated
frame and raises :class:`LocalProtocolError`.

The buffer never holds more than one header plus one body of at most
``max_body`` bytes beyond what the caller already fed, and callers feed at
most one read's worth at a time, so memory is bounded by the limit.
"""
from __future__ import annotations

from typing import Tuple, Union

from .errors import LocalProtocolError
from .wire import (HEADER, HEADER_SIZE, KNOWN_FLAGS, MAGIC, WIRE_VERSION,
                   Message)

__all__ = ["FrameReader", "NEED_DATA", "EOF", "DEFAULT_MAX_BODY"]

# 64 MiB: large enough for any Ansible module payload (AnsiballZ zips are
# well under 1 MiB) and bulk data is streamed in 128 KiB chunks, small
# enough that a hostile peer cannot make us buffer unbounded memory.
DEFAULT_MAX_BODY = 64 * 1024 * 1024


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
EOF = _Sentinel("EOF")

Event = Union[Message, _Sentinel]

_HEADER, _BODY, _ERROR, _CLOSED = "HEADER", "BODY", "ERROR", "CLOSED"


class FrameReader:
    """Incremental frame parser for one stream.

    Args:
        max_body: largest body accepted; a bigger declared length raises
            LocalProtocolError before any of the body is buffered.
        name: used in error messages.
    """

    def __init__(self, max_body: int = DEFAULT_MAX_BODY, name: str = "stream") -> None:
        self.max_body = max_body
        self.name = name
        self._buf = bytearray()
        self._pos = 0
        self._state = _HEADER
        self._header: Tuple[int, ...] = ()
        self._eof = False
        self._error: LocalProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Feed bytes; ``b""`` means the peer closed its end."""
        if self._eof:
            if data:
                self._fail("data after EOF")
            return
        if not data:
            self._eof = True
            return
        self._buf += data

    def next_event(self) -> Event:
        """Return the next Message, NEED_DATA or EOF.

        Raises:
            LocalProtocolError: bad magic, version, flags, an oversized
                frame, or EOF in the middle of a frame. Once raised, every
                later call raises the same error.
        """
        if self._error is not None:
            raise self._error
        if self._state == _CLOSED:
            return EOF
        avail = len(self._buf) - self._pos
        if self._state == _HEADER:
            if avail < HEADER_SIZE:
                return self._need(avail, HEADER_SIZE)
            hdr = HEADER.unpack_from(self._buf, self._pos)
            magic, version, flags, _dst, _src, _auth, _h, _r, length = hdr
            if magic != MAGIC:
                self._fail("bad magic %#06x (garbage on the stream?)" % magic)
            if version != WIRE_VERSION:
                self._fail("wire version %d, expected %d" % (version, WIRE_VERSION))
            if flags & ~KNOWN_FLAGS:
                self._fail("unknown flags %#x" % flags)
            if length > self.max_body:
                self._fail("frame body of %d bytes exceeds the limit of %d bytes"
                           % (length, self.max_body))
            self._header = hdr
            self._pos += HEADER_SIZE
            avail -= HEADER_SIZE
            self._state = _BODY  # HEADER -> BODY
        length = self._header[8]
        if avail < length:
            return self._need(avail, length)
        start = self._pos
        body = bytes(self._buf[start:start + length])
        self._pos = start + length
        if self._pos > 65536 or self._pos == len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0
        _m, _v, flags, dst, src, auth, handle, reply_to, _l = self._header
        self._state = _HEADER  # BODY -> HEADER
        return Message(dst, src, auth, handle, reply_to, flags, body)

    def _need(self, have: int, want: int) -> Event:
        if not self._eof:
            return NEED_DATA
        if self._state == _HEADER and have == 0:
            self._state = _CLOSED  # HEADER -> CLOSED on clean EOF
            return EOF
        what = "header" if self._state == _HEADER else "body"
        self._fail("stream ended inside a frame %s (%d of %d bytes)" % (what, have, want))
        raise AssertionError("unreachable")

    def _fail(self, reason: str) -> None:
        self._state = _ERROR  # any -> ERROR
        self._error = LocalProtocolError("%s: %s" % (self.name, reason))
        raise self._error
