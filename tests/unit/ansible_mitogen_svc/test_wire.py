"""Tests for ansible_mitogen_svc.wire: the header layout and Message."""
from __future__ import annotations

import struct

import pytest

from ansible_mitogen_svc import codec, wire
from ansible_mitogen_svc.errors import LoadError
from ansible_mitogen_svc.wire import (FLAG_DEAD, FLAG_ERROR, FLAG_RAW, HEADER, HEADER_SIZE,
                                      MAGIC, MAX_HANDLE, MAX_ID, WIRE_VERSION, Message)

pytestmark = pytest.mark.timeout(30)


def test_header_is_40_bytes_big_endian() -> None:
    assert HEADER_SIZE == HEADER.size == 40
    assert HEADER.format.lstrip("@=<>!") == "HBBQQQIII"
    assert HEADER.format[0] == ">"
    assert MAGIC == 0x4D53 and struct.pack(">H", MAGIC) == b"MS"


def test_pack_lays_out_every_field() -> None:
    msg = Message(dst=7, src=3, auth=2, handle=1001, reply_to=1002, flags=FLAG_RAW,
                  body=b"payload")
    frame = msg.pack()
    assert len(frame) == HEADER_SIZE + 7
    assert frame[:2] == b"MS"
    assert HEADER.unpack_from(frame) == (MAGIC, WIRE_VERSION, FLAG_RAW, 7, 3, 2, 1001, 1002, 7)
    assert frame[HEADER_SIZE:] == b"payload"
    assert frame[2] == WIRE_VERSION and frame[3] == FLAG_RAW
    assert frame[4:12] == (7).to_bytes(8, "big")
    assert frame[36:40] == (7).to_bytes(4, "big")


def test_pack_then_parse_round_trips_extreme_values() -> None:
    for msg in (Message(0, 0, 0, 0, 0, 0, b""),
                Message(MAX_ID, MAX_ID, MAX_ID, MAX_HANDLE, MAX_HANDLE,
                        FLAG_RAW | FLAG_ERROR | FLAG_DEAD, b"\x00" * 1000)):
        frame = msg.pack()
        fields = HEADER.unpack_from(frame)
        parsed = Message(fields[3], fields[4], fields[5], fields[6], fields[7], fields[2],
                         frame[HEADER_SIZE:HEADER_SIZE + fields[8]])
        assert parsed == msg


def test_out_of_range_fields_cannot_be_packed() -> None:
    with pytest.raises(struct.error):
        Message(MAX_ID + 1, 0, 0, 1).pack()
    with pytest.raises(struct.error):
        Message(0, 0, 0, MAX_HANDLE + 1).pack()
    with pytest.raises(struct.error):
        Message(-1, 0, 0, 1).pack()


def test_defaults_and_encoded() -> None:
    bare = Message(1, 2, 3, 4)
    assert (bare.reply_to, bare.flags, bare.body) == (0, 0, b"")
    msg = Message.encoded(5, 6, wire.HANDLE_CALL_SERVICE, ("svc", "m", {"a": 1}), reply_to=1000)
    assert (msg.dst, msg.src, msg.auth, msg.handle, msg.reply_to, msg.flags) == (
        5, 6, 6, 1, 1000, 0)
    assert msg.body == codec.dumps(("svc", "m", {"a": 1}))
    assert msg.data() == ("svc", "m", {"a": 1})
    other = Message.encoded(5, 6, 7, None, auth=0, flags=FLAG_ERROR)
    assert other.auth == 0 and other.flags == FLAG_ERROR


def test_data_of_raw_and_bad_bodies() -> None:
    assert Message(1, 2, 3, 4, flags=FLAG_RAW, body=b"\xff\x00raw").data() == b"\xff\x00raw"
    with pytest.raises(LoadError):
        Message(1, 2, 3, 4, body=b"\xff\x00raw").data()
    with pytest.raises(LoadError):
        Message(1, 2, 3, 4, body=b"").data()


def test_messages_are_immutable_values() -> None:
    msg = Message(1, 2, 3, 4, body=b"x")
    with pytest.raises(AttributeError):
        msg.dst = 9  # type: ignore[misc]
    assert msg == Message(1, 2, 3, 4, 0, 0, b"x")
    assert hash(msg) == hash(Message(1, 2, 3, 4, 0, 0, b"x"))
    assert not hasattr(msg, "__dict__")


def test_repr_never_shows_the_body() -> None:
    msg = Message.encoded(1, 2, wire.HANDLE_CALL_FUNCTION, {"password": "hunter2"}, reply_to=1000)
    text = repr(msg)
    assert "hunter2" not in text and "password" not in text
    assert "handle=CALL_FUNCTION" in text and "body=<%d bytes>" % len(msg.body) in text
    assert "handle=1234" in repr(Message(1, 2, 3, 1234))


def test_flags_and_handles_are_distinct() -> None:
    assert len({FLAG_RAW, FLAG_ERROR, FLAG_DEAD}) == 3
    assert all(bin(f).count("1") == 1 for f in (FLAG_RAW, FLAG_ERROR, FLAG_DEAD))
    assert wire.KNOWN_FLAGS == FLAG_RAW | FLAG_ERROR | FLAG_DEAD
    fixed = [wire.HANDLE_CALL_SERVICE, wire.HANDLE_CALL_FUNCTION, wire.HANDLE_SHUTDOWN,
             wire.HANDLE_LOG]
    assert len(set(fixed)) == len(fixed)
    assert all(0 < h < wire.FIRST_DYNAMIC_HANDLE for h in fixed)
    assert set(wire.HANDLE_NAMES) == set(fixed)
