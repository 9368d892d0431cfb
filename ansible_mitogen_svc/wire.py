"""Frame header layout and the Message type.

Runs on: controller and targets (shipped). Sans-IO: no sockets, threads,
clocks or logging.

Every message on every stream is one frame: a fixed 40-byte header followed
by ``length`` bytes of body.

=========  ======  =====================================================
field      struct  meaning
=========  ======  =====================================================
magic      H       0x4D53 (``b"MS"``); anything else is garbage
version    B       WIRE_VERSION; a mismatch closes the stream
flags      B       FLAG_RAW, FLAG_ERROR, FLAG_DEAD (see below)
dst        Q       context id the message is for
src        Q       context id that sent it (checked against the stream)
auth       Q       context id on whose authority it was sent (checked)
handle     I       receiving handle in ``dst`` (see handles table)
reply_to   I       handle in ``src`` that wants the reply, 0 for none
length     I       body length in bytes; checked against the stream's
                   limit *before* the body is buffered
=========  ======  =====================================================

Flags: FLAG_RAW means the body is opaque bytes (bulk data); otherwise it is
a :mod:`codec` encoding of builtin types. FLAG_ERROR marks a reply whose body
encodes an error ``{"type", "message", "traceback"}``. FLAG_DEAD marks a
notice that a message could not be delivered; its body encodes the reason.
"""
from __future__ import annotations

import collections
import struct
from typing import Any, Optional

from . import codec

__all__ = [
    "MAGIC", "WIRE_VERSION", "HEADER", "HEADER_SIZE", "MAX_ID", "MAX_HANDLE",
    "FLAG_RAW", "FLAG_ERROR", "FLAG_DEAD", "Message",
    "HANDLE_CALL_SERVICE", "HANDLE_CALL_FUNCTION", "HANDLE_SHUTDOWN",
    "HANDLE_LOG", "FIRST_DYNAMIC_HANDLE", "HANDLE_NAMES",
]

MAGIC = 0x4D53
WIRE_VERSION = 1
HEADER = struct.Struct(">HBBQQQIII")
HEADER_SIZE = HEADER.size  # 40
MAX_ID = 2 ** 64 - 1
MAX_HANDLE = 2 ** 32 - 1

FLAG_RAW = 0x01
FLAG_ERROR = 0x02
FLAG_DEAD = 0x04
KNOWN_FLAGS = FLAG_RAW | FLAG_ERROR | FLAG_DEAD

# Well-known handles. Everything below FIRST_DYNAMIC_HANDLE is reserved;
# reply handles are allocated from FIRST_DYNAMIC_HANDLE upwards.
HANDLE_CALL_SERVICE = 1    # body: (service, method, kwargs) -> Pool
HANDLE_CALL_FUNCTION = 2   # body: (module, function, args, kwargs) -> agent
HANDLE_SHUTDOWN = 3        # body: reason; parent asks a context to exit
HANDLE_LOG = 4             # body: (logger, level, text); unused by default
FIRST_DYNAMIC_HANDLE = 1000

HANDLE_NAMES = {
    HANDLE_CALL_SERVICE: "CALL_SERVICE",
    HANDLE_CALL_FUNCTION: "CALL_FUNCTION",
    HANDLE_SHUTDOWN: "SHUTDOWN",
    HANDLE_LOG: "LOG",
}


# Messages are immutable named tuples rather than frozen dataclasses:
# importing dataclasses costs an agent ~25 ms of its ~100 ms start-up.
_MessageBase = collections.namedtuple(
    "_MessageBase", "dst src auth handle reply_to flags body", defaults=(0, 0, b""))


class Message(_MessageBase):
    """One frame: ``dst src auth handle reply_to flags body``. ``body`` is
    the undecoded body; use :meth:`data`."""

    __slots__ = ()

    @classmethod
    def encoded(cls, dst: int, src: int, handle: int, obj: Any, *,
                auth: Optional[int] = None, reply_to: int = 0,
                flags: int = 0) -> "Message":
        """Build a message whose body is ``codec.dumps(obj)``."""
        return cls(dst, src, src if auth is None else auth, handle,
                   reply_to, flags, codec.dumps(obj))

    def data(self) -> Any:
        """Decode the body. Raises LoadError for a bad body or a raw one."""
        if self.flags & FLAG_RAW:
            return self.body
        return codec.loads(self.body)

    def pack(self) -> bytes:
        """The whole frame as bytes."""
        header: bytes = HEADER.pack(MAGIC, WIRE_VERSION, self.flags, self.dst,
                                    self.src, self.auth, self.handle, self.reply_to,
                                    len(self.body))
        return header + bytes(self.body)

    def __repr__(self) -> str:
        # Bodies may hold secrets (passwords, no_log data): never show them.
        return "Message(dst=%d, src=%d, auth=%d, handle=%s, reply_to=%d, flags=%#x, body=<%d bytes>)" % (
            self.dst, self.src, self.auth,
            HANDLE_NAMES.get(self.handle, self.handle), self.reply_to,
            self.flags, len(self.body))
