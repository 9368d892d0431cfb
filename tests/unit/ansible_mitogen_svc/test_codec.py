"""Tests for ansible_mitogen_svc.codec: round trips, hostile input, errors."""
from __future__ import annotations

import array
import collections
import enum
import math
import random
import struct
import time
import tracemalloc
from typing import Any, List

import pytest

from ansible_mitogen_svc import codec
from ansible_mitogen_svc.codec import VERSION, dumps, loads
from ansible_mitogen_svc.errors import CodecError, DumpError, LoadError


def _same(a: Any, b: Any) -> bool:
    """Equal, with identical types all the way down (so 1 != True and
    (1,) != [1]); nan equals nan and -0.0 differs from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1.0, a) == math.copysign(1.0, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return (len(a) == len(b) and all(_same(k, j) for k, j in zip(a, b))
                and all(_same(a[k], b[k]) for k in a))
    return bool(a == b)  # scalars, and sets (whose members are plain scalars/tuples here)


def _round_trip(value: Any) -> Any:
    data = dumps(value)
    assert isinstance(data, bytes)
    assert data[0] == VERSION
    return loads(data)


SCALARS = [
    None, True, False,
    0, 1, -1, 127, 128, -128, -129, 2 ** 31, -(2 ** 31) - 1,
    2 ** 63 - 1, -(2 ** 63), 2 ** 63, -(2 ** 63) - 1, 2 ** 64, 2 ** 200, -(2 ** 200),
    0.0, -0.0, 1.5, -2.25e-300, 1e308, float("inf"), float("-inf"),
    "", "a", "héllo wörld", "\u20ac\U0001f600", "\udc80", "a\ud800b\udfff", "\x00",
    "x" * 70000,
    b"", b"\x00\xff", bytes(range(256)) * 300,
]


@pytest.mark.parametrize("value", SCALARS, ids=lambda v: repr(v)[:30])
def test_round_trip_scalars(value: Any) -> None:
    assert _same(_round_trip(value), value)


def test_round_trip_nan() -> None:
    out = _round_trip(float("nan"))
    assert isinstance(out, float) and math.isnan(out)


def test_bool_stays_bool_and_int_stays_int() -> None:
    out = _round_trip([True, 1, False, 0])
    assert [type(x) for x in out] == [bool, int, bool, int]


@pytest.mark.parametrize("value", [
    [], (), {}, set(), frozenset(),
    [1, "two", b"three", None, 4.0],
    (1, (2, (3, ())), [4]),
    [(), [], ((),)],
    {"a": 1, "b": [1, 2, {"c": (None, True)}]},
    {(1, "x"): "tuple key", 7: "int key", None: "none key", b"k": 1, 2.5: 2,
     True: "bool key", frozenset({1}): "frozenset key", "": {}},
    {1, "a", (2, 3), None, b"b"},
    frozenset({frozenset({1, 2}), (1,), "z"}),
    {"z": 1, "a": 2, "m": 3},
    [[[[[[[[["deep"]]]]]]]]],
])
def test_round_trip_containers(value: Any) -> None:
    assert _same(_round_trip(value), value)


def test_dict_order_preserved() -> None:
    value = {k: i for i, k in enumerate(["z", "b", "y", "a", 3, None])}
    assert list(_round_trip(value)) == ["z", "b", "y", "a", 3, None]


def test_tuple_list_distinction_nested() -> None:
    out = _round_trip({"t": (1, [2, (3,)]), "l": [(1,), []]})
    assert type(out["t"]) is tuple and type(out["t"][1]) is list
    assert type(out["t"][1][1]) is tuple and type(out["l"][0]) is tuple


class MyStr(str):
    def encode(self, *args: Any, **kwargs: Any) -> bytes:  # must not be used
        return b"WRONG"


class MyBytes(bytes):
    pass


class MyInt(int):
    pass


class MyFloat(float):
    pass


class MyList(list):  # type: ignore[type-arg]
    def __iter__(self) -> Any:  # disagrees with len(): must not corrupt
        return iter([1, 2, 3])


class MyDict(dict):  # type: ignore[type-arg]
    pass


class Color(enum.IntEnum):
    RED = 1


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize("value, expected", [
    (MyStr("unsafe"), "unsafe"),
    (MyBytes(b"raw"), b"raw"),
    (MyInt(5), 5),
    (MyInt(2 ** 100), 2 ** 100),
    (MyFloat(2.5), 2.5),
    (MyDict(a=MyStr("b")), {"a": "b"}),
    (collections.OrderedDict([("b", 1), ("a", 2)]), {"b": 1, "a": 2}),
    (collections.defaultdict(list, x=[1]), {"x": [1]}),
    (Point(1, 2), (1, 2)),
    (Color.RED, 1),
    (bytearray(b"ba"), b"ba"),
    (memoryview(b"mv"), b"mv"),
    (memoryview(b"abcdef")[::2], b"ace"),
    (memoryview(array.array("i", [1, 2])), array.array("i", [1, 2]).tobytes()),
    ({MyStr("k"): MyList()}, {"k": [1, 2, 3]}),
])
def test_subclasses_load_as_builtin_base(value: Any, expected: Any) -> None:
    assert _same(_round_trip(value), expected)


def test_compact_small_ints() -> None:
    assert len(dumps(0)) == 3
    assert len(dumps(-128)) == 3
    assert len(dumps(1000)) == 10
    assert len(dumps(2 ** 63)) == 1 + 1 + 4 + 9


def test_public_api() -> None:
    assert codec.__all__ == ["VERSION", "dumps", "loads", "canonical_key"]
    assert VERSION == 1
    assert issubclass(DumpError, CodecError) and issubclass(LoadError, ValueError)


# --- hostile input -------------------------------------------------------

RICH = {
    "s": "héllo\udc80", "b": b"\x00\x01", "i": [0, -1, 300, 2 ** 63, -(2 ** 200)],
    "f": 1.5, "t": (None, True, False), "set": {1, 2}, "fs": frozenset({"a"}),
    (1, 2): {"nested": [[], {}]},
}


def test_every_truncated_prefix_raises_load_error() -> None:
    data = dumps(RICH)
    for cut in range(len(data)):
        with pytest.raises(LoadError):
            loads(data[:cut])


def test_trailing_bytes() -> None:
    data = dumps([1, 2])
    with pytest.raises(LoadError, match="trailing bytes.*offset %d" % len(data)):
        loads(data + b"\x00")


def test_empty_and_bad_version() -> None:
    with pytest.raises(LoadError, match="offset 0"):
        loads(b"")
    with pytest.raises(LoadError, match="version"):
        loads(bytes([VERSION + 1]) + dumps(None)[1:])
    with pytest.raises(LoadError, match="version"):
        loads(b"\x00\x00")


def test_unknown_opcode() -> None:
    with pytest.raises(LoadError, match="unknown opcode 0xff at offset 1"):
        loads(bytes([VERSION, 0xFF]))
    with pytest.raises(LoadError, match="unknown opcode 0x0e at offset 6"):
        loads(bytes([VERSION, codec.OP_LIST, 0, 0, 0, 1, 0x0E]))


def test_invalid_utf8() -> None:
    data = bytes([VERSION, codec.OP_STR]) + struct.pack(">I", 2) + b"a\xff"
    with pytest.raises(LoadError, match="utf-8 at offset 7"):
        loads(data)


def test_non_hashable_dict_key_and_set_member() -> None:
    empty_list = bytes([codec.OP_LIST, 0, 0, 0, 0])
    key = bytes([VERSION, codec.OP_DICT, 0, 0, 0, 1]) + empty_list + b"\x00"
    with pytest.raises(LoadError, match="non-hashable dict key.*offset 6"):
        loads(key)
    for op in (codec.OP_SET, codec.OP_FROZENSET):
        member = bytes([VERSION, op, 0, 0, 0, 1]) + empty_list
        with pytest.raises(LoadError, match="non-hashable set member"):
            loads(member)


def test_random_garbage_only_raises_load_error() -> None:
    rng = random.Random(20240601)
    for _ in range(3000):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        try:
            loads(bytes([VERSION]) + body if rng.random() < 0.8 else body)
        except LoadError:
            pass


def test_mutated_valid_encodings_only_raise_load_error() -> None:
    rng = random.Random(7)
    base = bytearray(dumps(RICH))
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(1, len(data))] = rng.randrange(256)
        try:
            loads(bytes(data))
        except LoadError:
            pass


@pytest.mark.parametrize("op", [codec.OP_STR, codec.OP_BYTES, codec.OP_BIGINT,
                                codec.OP_LIST, codec.OP_TUPLE, codec.OP_DICT,
                                codec.OP_SET, codec.OP_FROZENSET])
def test_huge_declared_length_fails_fast_without_allocating(op: int) -> None:
    data = bytes([VERSION, op]) + struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 8
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(LoadError, match="truncated"):
            loads(data)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 100_000


def _nested_lists(levels: int) -> bytes:
    return bytes([VERSION]) + bytes([codec.OP_LIST, 0, 0, 0, 1]) * levels + b"\x00"


def test_max_depth() -> None:
    assert loads(_nested_lists(64)) is not None
    with pytest.raises(LoadError, match="max_depth"):
        loads(_nested_lists(65))
    assert loads(_nested_lists(3), max_depth=3) == [[[None]]]
    with pytest.raises(LoadError, match="max_depth at offset 16"):
        loads(_nested_lists(4), max_depth=3)
    assert loads(dumps(5), max_depth=0) == 5
    with pytest.raises(LoadError, match="max_depth"):
        loads(dumps([]), max_depth=0)
    with pytest.raises(LoadError, match="max_depth"):
        loads(dumps([]), max_depth=-1)


def test_depth_bomb_never_raises_recursion_error() -> None:
    bomb = _nested_lists(200_000)
    with pytest.raises(LoadError, match="max_depth"):
        loads(bomb)
    with pytest.raises(LoadError):
        loads(bomb, max_depth=10 ** 9)


def test_max_items() -> None:
    data = dumps([[1, 2], [3], {"a": 1, "b": 2}])  # 3 + 2 + 1 + 2 items
    assert loads(data, max_items=8) == [[1, 2], [3], {"a": 1, "b": 2}]
    with pytest.raises(LoadError, match="too many items"):
        loads(data, max_items=7)
    with pytest.raises(LoadError, match="too many items"):
        loads(dumps(list(range(100))), max_items=99)


def test_loads_accepts_bytes_like() -> None:
    data = dumps({"a": [1]})
    assert loads(bytearray(data)) == {"a": [1]}
    assert loads(memoryview(data)) == {"a": [1]}


# --- DumpError ------------------------------------------------------------

def _function() -> None:
    pass


def test_dump_error_object_at_root() -> None:
    with pytest.raises(DumpError) as info:
        dumps(object())
    assert str(info.value) == "cannot encode object of type 'object' at <root>"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_dump_error_names_type_and_path() -> None:
    with pytest.raises(DumpError) as info:
        dumps({"a": [1, 2, ({"k": _function},)]})
    assert str(info.value) == (
        "cannot encode object of type 'function' at <root>['a'][2][0]['k']")


def test_dump_error_in_dict_key_and_set_member() -> None:
    with pytest.raises(DumpError, match=r"type 'object' at <root>\['x'\]<key \(1, <object"):
        dumps({"x": {(1, object()): 2}})
    with pytest.raises(DumpError, match=r"type 'object' at <root><member \(<object .*>,\)>\[0\]$"):
        dumps({(object(),)})


def test_dump_error_self_referencing_containers() -> None:
    loop: List[Any] = []
    loop.append(loop)
    with pytest.raises(DumpError) as info:
        dumps(loop)
    message = str(info.value)
    assert message.startswith("cannot encode object of type 'list' at <root>[0][0]")
    assert "nesting deeper than 64" in message
    cycle: dict = {}  # type: ignore[type-arg]
    cycle["me"] = [cycle]
    with pytest.raises(DumpError, match=r"type 'dict' at <root>\['me'\]\[0\]\['me'\]"):
        dumps(cycle)


def test_dump_depth_limit_matches_load_default() -> None:
    value: Any = None
    for _ in range(64):
        value = [value]
    assert _same(loads(dumps(value)), value)
    with pytest.raises(DumpError, match="nesting deeper"):
        dumps([value])


# --- property test ------------------------------------------------------

def test_property_round_trip() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    text = st.text(alphabet=st.integers(0, 0x10FFFF).map(chr))
    scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2 ** 70, 2 ** 70)
               | st.floats(allow_nan=False) | text | st.binary())
    hashables = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3).map(tuple)
                             | st.frozensets(inner, max_size=3), max_leaves=8)
    values = st.recursive(
        scalars,
        lambda inner: (st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
                       | st.dictionaries(hashables, inner, max_size=4)
                       | st.sets(hashables, max_size=4) | st.frozensets(hashables, max_size=4)),
        max_leaves=20)

    @hypothesis.settings(max_examples=200, deadline=None, database=None)
    @hypothesis.given(values)
    def check(value: Any) -> None:
        assert _same(_round_trip(value), value)

    check()


def test_canonical_key_ignores_dict_and_set_order() -> None:
    a = {"spec": {"host": "h", "args": ["-p", "22"], "tags": {"x", "y", 3}}}
    b = {"spec": {"tags": {3, "y", "x"}, "args": ["-p", "22"], "host": "h"}}
    assert dumps(a) != dumps(b)  # the wire encoding keeps insertion order
    assert codec.canonical_key(a) == codec.canonical_key(b)


def test_canonical_key_keeps_types_and_values_apart() -> None:
    keys = [codec.canonical_key(v) for v in (
        [1, 2], (1, 2), {1, 2}, frozenset({1, 2}) | {3}, ("s", (1, 2)), {1: 2}, ((1, 2),),
        {"a": 1}, {"a": 2}, "a", b"a", 1, 1.0, True, None)]
    assert len(set(keys)) == len(keys)
    assert codec.canonical_key({1, 2}) == codec.canonical_key(frozenset({2, 1}))


def test_canonical_key_refuses_what_dumps_refuses() -> None:
    with pytest.raises(DumpError):
        codec.canonical_key({"a": object()})

