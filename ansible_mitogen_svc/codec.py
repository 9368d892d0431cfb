"""Binary serializer for message bodies, limited to builtin types.

Runs on: controller and targets (shipped). Sans-IO.

No pickle, marshal or eval: loads() can only ever build the types below.

Format
------
An encoding is one version byte (``VERSION``) and then exactly one value.
A value is an opcode byte and then its payload. Every number is big-endian;
``u32`` is an unsigned 32-bit length or count.

====  =========  =====================================================
op    type       payload
====  =========  =====================================================
0x00  None       (none)
0x01  True       (none)
0x02  False      (none)
0x03  int        i8, for -128..127
0x04  int        i64, for -2**63..2**63-1
0x05  float      8-byte IEEE 754 binary64 (nan, inf, -0.0 kept)
0x06  int        u32 n, then n bytes of two's complement (any other int)
0x07  str        u32 n, then n bytes of UTF-8 with 'surrogatepass'
0x08  bytes      u32 n, then n bytes
0x09  list       u32 n, then n values
0x0A  tuple      u32 n, then n values
0x0B  dict       u32 n, then n (key, value) pairs in insertion order
0x0C  set        u32 n, then n values
0x0D  frozenset  u32 n, then n values
====  =========  =====================================================

str uses 'surrogatepass', so any Python str (lone surrogates too) round-trips.
Subclasses of str, bytes, int, float, list, tuple, dict, set and frozenset
are written, and so load, as their builtin base (Ansible passes str
subclasses such as AnsibleUnsafeText); bytearray and memoryview as bytes.
Other types raise DumpError naming the type and path (``<root>[0]['key']``),
as does nesting deeper than DEFAULT_MAX_DEPTH (e.g. a self-referencing list).
loads() checks each declared length or count against the bytes left before
slicing or allocating, and counts container items (a dict entry is one item)
against ``max_items``.
"""
from __future__ import annotations

import reprlib
import struct
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import DumpError, LoadError

__all__ = ["VERSION", "dumps", "loads", "canonical_key"]

VERSION = 1
DEFAULT_MAX_DEPTH = 64

OP_NONE, OP_TRUE, OP_FALSE, OP_INT8, OP_INT64, OP_FLOAT = range(0x00, 0x06)
# Every opcode from OP_BIGINT upwards has a u32 length or count after it.
OP_BIGINT, OP_STR, OP_BYTES = range(0x06, 0x09)
OP_LIST, OP_TUPLE, OP_DICT, OP_SET, OP_FROZENSET = range(0x09, 0x0E)

_VERSION_BYTE = bytes([VERSION])
_NONE, _TRUE, _FALSE = bytes([OP_NONE]), bytes([OP_TRUE]), bytes([OP_FALSE])
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1

# Writers pack the opcode together with its fixed-width payload or header.
_pack_int8 = struct.Struct(">Bb").pack
_pack_int64 = struct.Struct(">Bq").pack
_pack_float = struct.Struct(">Bd").pack
_pack_head = struct.Struct(">BI").pack
# Readers start after the opcode.
_read_u32 = struct.Struct(">I").unpack_from
_FIXED = {OP_INT8: (struct.Struct(">b").unpack_from, 1),
          OP_INT64: (struct.Struct(">q").unpack_from, 8),
          OP_FLOAT: (struct.Struct(">d").unpack_from, 8)}

_NoneType = type(None)
# The builtin bases a subclass can be encoded as.
_BASES = (str, int, float, bytes, bytearray, dict, list, tuple, set, frozenset)
_CONTAINER_OPS = {list: OP_LIST, tuple: OP_TUPLE, dict: OP_DICT, set: OP_SET,
                  frozenset: OP_FROZENSET}


class _Unencodable(Exception):
    """Internal: an object that cannot be encoded. ``path`` is built up
    leaf first while the exception unwinds through its containers."""

    def __init__(self, obj: object, note: str = "") -> None:
        super().__init__()
        self.obj = obj
        self.note = note
        self.path: List[str] = []


def _step(container: Any, item: Any, depth: int) -> str:
    """Error path only: the path step from ``container`` to ``item``, the
    item (or dict key) being encoded when an _Unencodable came up."""
    if isinstance(container, dict):
        try:
            _enc(item, lambda _chunk: None, depth)
        except _Unencodable:
            return "<key %s>" % reprlib.repr(item)
        return "[%s]" % reprlib.repr(item)
    if isinstance(container, (set, frozenset)):
        return "<member %s>" % reprlib.repr(item)
    # The first *identical* item failed: an earlier one would have failed first.
    for index, candidate in enumerate(container):
        if candidate is item:
            return "[%d]" % index
    return "[?]"


def _enc(obj: Any, write: Callable[[bytes], Any], depth: int, t: Optional[type] = None) -> None:
    """Write ``obj``. ``depth`` is how many more containers may nest. ``t``
    overrides type(obj) to encode a subclass as its builtin base."""
    if t is None:
        t = type(obj)
    if t is str:
        raw = str.encode(obj, "utf-8", "surrogatepass")
        write(_pack_head(OP_STR, len(raw)))
        write(raw)
    elif t is int:
        if -128 <= obj <= 127:
            write(_pack_int8(OP_INT8, obj))
        elif _INT64_MIN <= obj <= _INT64_MAX:
            write(_pack_int64(OP_INT64, obj))
        else:
            raw = int.to_bytes(obj, (obj.bit_length() + 8) // 8, "big", signed=True)
            write(_pack_head(OP_BIGINT, len(raw)))
            write(raw)
    elif t is _NoneType:
        write(_NONE)
    elif t is bool:
        write(_TRUE if obj else _FALSE)
    elif t is float:
        write(_pack_float(OP_FLOAT, obj))
    elif t in _CONTAINER_OPS:
        if depth == 0:
            raise _Unencodable(obj, ": nesting deeper than %d containers "
                                    "(self-referencing?)" % DEFAULT_MAX_DEPTH)
        write(_pack_head(_CONTAINER_OPS[t], len(obj)))
        depth -= 1
        if t is dict:
            try:
                for key, value in obj.items():
                    _enc(key, write, depth)
                    _enc(value, write, depth)
            except _Unencodable as exc:
                exc.path.append(_step(obj, key, depth))
                raise
        else:
            try:
                for item in obj:
                    _enc(item, write, depth)
            except _Unencodable as exc:
                exc.path.append(_step(obj, item, depth))
                raise
    elif t is bytes or t is bytearray or t is memoryview:
        raw = obj if t is bytes else bytes(obj)
        write(_pack_head(OP_BYTES, len(raw)))
        write(raw)
    else:
        for base in _BASES:
            if isinstance(obj, base):
                if base in _CONTAINER_OPS:
                    obj = base(obj)  # a plain copy, so len() and iteration agree
                return _enc(obj, write, depth, base)
        raise _Unencodable(obj)


def dumps(obj: Any) -> bytes:
    """Encode ``obj``; raise DumpError if it holds an unsupported type."""
    chunks: List[bytes] = [_VERSION_BYTE]
    try:
        _enc(obj, chunks.append, DEFAULT_MAX_DEPTH)
    except _Unencodable as exc:
        path = "<root>" + "".join(reversed(exc.path))
        message = DumpError.template.format(type=type(exc.obj).__qualname__, path=path)
        raise DumpError(message + exc.note) from None
    except struct.error:
        raise DumpError("cannot encode: a length or count exceeds 2**32-1") from None
    return b"".join(chunks)


def _truncated(pos: int, need: int, end: int, what: str) -> LoadError:
    return LoadError("truncated input: %s at offset %d needs %d bytes, but only %d remain"
                     % (what, pos, need, end - pos))


def _dec(data: bytes, pos: int, end: int, depth: int, budget: List[int]) -> Tuple[Any, int]:
    """Decode one value at ``pos``; return it and the offset just past it."""
    if pos >= end:
        raise _truncated(pos, 1, end, "opcode")
    op = data[pos]
    if op == OP_STR:  # the most common value gets its own fast path
        stop = pos + 5
        if stop > end:
            raise _truncated(pos + 1, 4, end, "length")
        stop += _read_u32(data, pos + 1)[0]
        if stop > end:
            raise _truncated(pos + 5, stop - pos - 5, end, "payload")
        try:
            return data[pos + 5:stop].decode("utf-8", "surrogatepass"), stop
        except UnicodeDecodeError as exc:
            raise LoadError("invalid utf-8 at offset %d" % (pos + 5 + exc.start)) from None
    pos += 1
    if op >= OP_BIGINT:
        if op > OP_FROZENSET:
            raise LoadError("unknown opcode 0x%02x at offset %d" % (op, pos - 1))
        if pos + 4 > end:
            raise _truncated(pos, 4, end, "length")
        n = _read_u32(data, pos)[0]
        pos += 4
        if op <= OP_BYTES:  # bytes or big int (str was handled above)
            stop = pos + n
            if stop > end:
                raise _truncated(pos, n, end, "payload")
            if op == OP_BYTES:
                return data[pos:stop], stop
            return int.from_bytes(data[pos:stop], "big", signed=True), stop
        start = pos - 5
        if depth <= 0:
            raise LoadError("nesting deeper than max_depth at offset %d" % start)
        need = n * 2 if op == OP_DICT else n  # every value takes >= 1 byte
        if need > end - pos:
            raise _truncated(pos, need, end, "%d items" % n)
        budget[0] -= n
        if budget[0] < 0:
            raise LoadError("too many items: container at offset %d exceeds max_items" % start)
        depth -= 1
        if op == OP_DICT:
            result: Dict[Any, Any] = {}
            for _ in range(n):
                key_pos = pos
                key, pos = _dec(data, pos, end, depth, budget)
                value, pos = _dec(data, pos, end, depth, budget)
                try:
                    result[key] = value
                except TypeError:
                    raise LoadError("non-hashable dict key of type %r at offset %d"
                                    % (type(key).__name__, key_pos)) from None
            return result, pos
        items: List[Any] = []
        append = items.append
        for _ in range(n):
            item, pos = _dec(data, pos, end, depth, budget)
            append(item)
        if op == OP_LIST:
            return items, pos
        if op == OP_TUPLE:
            return tuple(items), pos
        try:
            return (set(items) if op == OP_SET else frozenset(items)), pos
        except TypeError:
            raise LoadError("non-hashable set member in the set at offset %d" % start) from None
    if op <= OP_FALSE:
        return (None, True, False)[op], pos
    read, width = _FIXED[op]  # op is 3..5 here
    if pos + width > end:
        raise _truncated(pos, width, end, "number")
    return read(data, pos)[0], pos + width


def loads(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH,
          max_items: int = 10_000_000) -> Any:
    """Decode bytes from dumps(). Raise LoadError if the input is not exactly
    one valid encoding, nests containers deeper than ``max_depth`` or
    declares more than ``max_items`` container items in total."""
    if not isinstance(data, bytes):
        data = memoryview(data).tobytes()
    end = len(data)
    if end == 0:
        raise LoadError("truncated input: empty, expected the version byte at offset 0")
    if data[0] != VERSION:
        raise LoadError("bad version byte %d at offset 0 (expected %d)" % (data[0], VERSION))
    try:
        obj, pos = _dec(data, 1, end, max_depth, [max_items])
    except RecursionError:
        raise LoadError("nesting too deep for the Python stack; lower max_depth") from None
    if pos != end:
        raise LoadError("trailing bytes: the value ends at offset %d of %d" % (pos, end))
    return obj


def _canonical(obj: Any) -> Any:
    # Every container becomes a (tag, tuple) pair, so the result is
    # injective: a user's tuple can never look like a tagged set.
    if isinstance(obj, dict):
        pairs = [(_canonical(k), _canonical(v)) for k, v in obj.items()]
        pairs.sort(key=lambda kv: dumps(kv[0]))
        return ("d", tuple(pairs))
    if isinstance(obj, (set, frozenset)):
        return ("s", tuple(sorted((_canonical(m) for m in obj), key=dumps)))
    if isinstance(obj, list):
        return ("l", tuple(_canonical(x) for x in obj))
    if isinstance(obj, tuple):
        return ("t", tuple(_canonical(x) for x in obj))
    return obj


def canonical_key(obj: Any) -> bytes:
    """Bytes equal for equal values, whatever the order in which their dicts
    were built or their sets iterate: for keys (dedup, caches), never for
    the wire. Raises DumpError like :func:`dumps`."""
    return dumps(_canonical(obj))
