"""Tests for ansible_mitogen_svc.protocol.FrameReader: framing, limits,
hostile input and EOF handling."""
from __future__ import annotations

from typing import List

import pytest

from ansible_mitogen_svc.errors import LocalProtocolError, ProtocolError
from ansible_mitogen_svc.protocol import DEFAULT_MAX_BODY, EOF, NEED_DATA, FrameReader
from ansible_mitogen_svc.wire import (FLAG_DEAD, FLAG_ERROR, FLAG_RAW, HEADER, HEADER_SIZE,
                                      MAGIC, WIRE_VERSION, Message)

pytestmark = pytest.mark.timeout(30)

MESSAGES = [
    Message(0, 1, 1, 1, 1000, 0, b""),
    Message(2 ** 64 - 1, 5, 4, 2, 0, FLAG_RAW, b"\x00" * 300),
    Message(1, 2, 2, 1001, 0, FLAG_ERROR, b"err"),
    Message(3, 3, 3, 3, 3, FLAG_DEAD | FLAG_RAW, bytes(range(256)) * 5),
]
STREAM = b"".join(m.pack() for m in MESSAGES)


def _header(length: int, magic: int = MAGIC, version: int = WIRE_VERSION,
            flags: int = 0) -> bytes:
    return HEADER.pack(magic, version, flags, 1, 2, 2, 3, 0, length)


def _drain(reader: FrameReader) -> List[object]:
    out = []
    while True:
        event = reader.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
        if event is EOF:
            return out


def test_whole_input_at_once() -> None:
    reader = FrameReader()
    reader.receive_data(STREAM)
    assert _drain(reader) == MESSAGES
    assert reader.buffered == 0
    assert reader.next_event() is NEED_DATA


def test_one_byte_at_a_time() -> None:
    reader = FrameReader()
    got: List[object] = []
    for i in range(len(STREAM)):
        reader.receive_data(STREAM[i:i + 1])
        got += _drain(reader)
    assert got == MESSAGES
    reader.receive_data(b"")
    assert reader.next_event() is EOF
    assert reader.next_event() is EOF  # and stays there


@pytest.mark.parametrize("size", [7, 39, 40, 41, 333, 4096])
def test_arbitrary_chunking(size: int) -> None:
    reader = FrameReader()
    got: List[object] = []
    for i in range(0, len(STREAM), size):
        reader.receive_data(STREAM[i:i + size])
        got += _drain(reader)
    assert got == MESSAGES


def test_trailing_data_waits_for_the_rest() -> None:
    reader = FrameReader()
    nxt = MESSAGES[1].pack()
    reader.receive_data(MESSAGES[0].pack() + nxt[:50])
    assert reader.next_event() == MESSAGES[0]
    assert reader.next_event() is NEED_DATA
    assert reader.buffered == 50 - HEADER_SIZE  # header consumed, body partly here
    reader.receive_data(nxt[50:])
    assert reader.next_event() == MESSAGES[1]
    assert reader.next_event() is NEED_DATA and reader.buffered == 0


def test_many_small_frames_do_not_grow_the_buffer() -> None:
    reader = FrameReader()
    frame = Message(1, 2, 2, 3, 0, 0, b"x" * 10).pack()
    for _ in range(20000):
        reader.receive_data(frame)
        assert reader.next_event() is not NEED_DATA
    assert reader.next_event() is NEED_DATA
    assert reader.buffered == 0 and len(reader._buf) == 0


def test_body_at_the_limit_is_accepted() -> None:
    reader = FrameReader(max_body=100)
    msg = Message(1, 2, 2, 3, 0, FLAG_RAW, b"z" * 100)
    reader.receive_data(msg.pack())
    assert reader.next_event() == msg


def test_oversized_length_is_refused_before_the_body_is_buffered() -> None:
    reader = FrameReader(max_body=100, name="ssh.host9")
    reader.receive_data(_header(101))  # the header alone: no body byte sent yet
    with pytest.raises(LocalProtocolError) as exc:
        reader.next_event()
    assert str(exc.value) == ("ssh.host9: frame body of 101 bytes exceeds the limit "
                              "of 100 bytes")
    assert reader.buffered <= HEADER_SIZE


def test_default_limit_refuses_a_4_gib_claim_at_once() -> None:
    reader = FrameReader()
    assert reader.max_body == DEFAULT_MAX_BODY == 64 * 1024 * 1024
    reader.receive_data(_header(2 ** 32 - 1) + b"a" * 10)
    with pytest.raises(LocalProtocolError, match="exceeds the limit"):
        reader.next_event()


@pytest.mark.parametrize("header,reason", [
    (_header(0, magic=0x4745), "bad magic 0x4745 (garbage on the stream?)"),
    (b"GET / HTTP/1.1\r\nHost: example\r\n\r\n" + b"\n" * 8, "bad magic 0x4745"),
    (_header(0, version=WIRE_VERSION + 1), "wire version %d, expected %d"
     % (WIRE_VERSION + 1, WIRE_VERSION)),
    (_header(0, version=0), "wire version 0, expected %d" % WIRE_VERSION),
    (_header(0, flags=0x08), "unknown flags 0x8"),
    (_header(0, flags=0xF0 | FLAG_RAW), "unknown flags 0xf1"),
])
def test_bad_header_fields(header: bytes, reason: str) -> None:
    reader = FrameReader(name="local")
    reader.receive_data(header)
    with pytest.raises(LocalProtocolError) as exc:
        reader.next_event()
    assert str(exc.value).startswith("local: " + reason)
    assert isinstance(exc.value, ProtocolError)
    # The error is sticky: more data, or asking again, raises it again.
    first = exc.value
    reader.receive_data(MESSAGES[0].pack())
    with pytest.raises(LocalProtocolError) as again:
        reader.next_event()
    assert again.value is first


def test_garbage_after_good_frames() -> None:
    reader = FrameReader()
    reader.receive_data(MESSAGES[0].pack() + b"\x00" * HEADER_SIZE)
    assert reader.next_event() == MESSAGES[0]
    with pytest.raises(LocalProtocolError, match="bad magic 0x0000"):
        reader.next_event()


def test_clean_eof() -> None:
    reader = FrameReader()
    reader.receive_data(MESSAGES[0].pack())
    reader.receive_data(b"")
    assert reader.next_event() == MESSAGES[0]
    assert reader.next_event() is EOF
    reader.receive_data(b"")  # a second EOF is harmless
    assert reader.next_event() is EOF


@pytest.mark.parametrize("cut,what", [
    (1, "header (1 of 40 bytes)"),
    (39, "header (39 of 40 bytes)"),
    (40, "body (0 of 300 bytes)"),
    (41, "body (1 of 300 bytes)"),
    (339, "body (299 of 300 bytes)"),
])
def test_eof_mid_frame(cut: int, what: str) -> None:
    frame = MESSAGES[1].pack()
    assert len(frame) == 340
    reader = FrameReader(name="s")
    reader.receive_data(frame[:cut])
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"")
    with pytest.raises(LocalProtocolError) as exc:
        reader.next_event()
    assert str(exc.value) == "s: stream ended inside a frame " + what
    with pytest.raises(LocalProtocolError):
        reader.next_event()


def test_data_after_eof_is_an_error() -> None:
    reader = FrameReader()
    reader.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="data after EOF"):
        reader.receive_data(b"more")
