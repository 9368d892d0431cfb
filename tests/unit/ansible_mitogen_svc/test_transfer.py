"""Tests for ansible_mitogen_svc.transfer: the windowed stream state machines.

Pure: no processes, files or threads. The sender and the receiver are
driven with integers, in every order the FIFO streams between them allow.
"""
from __future__ import annotations

import ast
import copy
import itertools
import random
from typing import List, Optional, Tuple

import pytest

from ansible_mitogen_svc import transfer
from ansible_mitogen_svc.errors import LocalProtocolError, ProtocolError
from ansible_mitogen_svc.transfer import (ABORTED, CHUNK_SIZE, COMPLETE, DONE, DRAINING,
                                          FAILED, RECEIVING, SENDING, WINDOW,
                                          ReceiverState, SenderState)


# -- constants and purity ----------------------------------------------------------
def test_constants_make_the_documented_trade_off():
    assert CHUNK_SIZE == 128 * 1024
    assert WINDOW == 4 * 1024 * 1024
    assert WINDOW % CHUNK_SIZE == 0
    # >= 400 MB/s per transfer at a 10 ms round trip
    assert WINDOW / 0.010 >= 400e6
    assert transfer.MAX_WINDOW >= WINDOW


def test_module_is_sans_io():
    """Only typing and the package's errors: no os, socket, threading, time."""
    with open(transfer.__file__, encoding="utf-8") as fp:
        tree = ast.parse(fp.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "typing", ".errors"}, imported


def test_docstring_has_numbered_theory_of_operation():
    doc = transfer.__doc__
    assert "Theory of operation" in doc
    assert "Normal operation:" in doc and "Shutdown and abort:" in doc
    for n in range(1, 8):
        assert "\n%d. " % n in doc


# -- constructor checks ----------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc", [
    (dict(size=-1), ValueError),
    (dict(size=1.5), TypeError),
    (dict(size=True), TypeError),
    (dict(size=10, chunk_size=0), ValueError),
    (dict(size=10, chunk_size=4, window=3), ValueError),
    (dict(size=10, window=0, chunk_size=1), ValueError),
])
def test_sender_rejects_bad_numbers(kwargs, exc):
    with pytest.raises(exc):
        SenderState(**kwargs)


@pytest.mark.parametrize("kwargs, exc", [
    (dict(expected_size=-1), ValueError),
    (dict(expected_size="1"), TypeError),
    (dict(expected_size=1, window=0), ValueError),
    (dict(expected_size=1, window=4, ack_every=5), ValueError),
    (dict(expected_size=1, window=4, ack_every=0), ValueError),
])
def test_receiver_rejects_bad_numbers(kwargs, exc):
    with pytest.raises(exc):
        ReceiverState(**kwargs)


def test_errors_are_local_protocol_errors():
    assert issubclass(LocalProtocolError, ProtocolError)


# -- sender --------------------------------------------------------------------------------
def test_sender_hands_out_chunks_within_the_window():
    s = SenderState(10, chunk_size=3, window=6)
    assert s.state == SENDING
    assert s.next_chunk() == (0, 3)
    assert s.next_chunk() == (3, 3)
    assert s.next_chunk() is None          # window full
    assert s.in_flight == 6 and s.wants() == 0
    assert s.on_ack(3) == 3                 # frees 3 bytes of credit
    assert s.next_chunk() == (6, 3)
    assert s.next_chunk() is None
    assert s.on_ack(6) == 3
    assert s.next_chunk() == (9, 1)        # short last chunk
    assert s.next_chunk() is None
    assert s.take_end() is True
    assert s.state == DRAINING
    assert s.take_end() is False           # exactly once
    assert s.on_ack(9) == 3
    assert s.state == DRAINING
    assert s.on_ack(10) == 1
    assert s.state == DONE and s.finished
    assert s.next_chunk() is None


def test_sender_window_not_a_multiple_of_the_chunk():
    s = SenderState(100, chunk_size=4, window=10)
    assert s.next_chunk() == (0, 4)
    assert s.next_chunk() == (4, 4)
    assert s.next_chunk() is None          # 8 + 4 > 10
    assert s.on_ack(1) == 1
    assert s.next_chunk() is None          # 7 + 4 > 10
    assert s.on_ack(2) == 1
    assert s.next_chunk() == (8, 4)


def test_sender_end_waits_for_every_byte_to_be_handed_out():
    s = SenderState(4, chunk_size=2, window=2)
    assert s.take_end() is False
    s.next_chunk()
    assert s.take_end() is False
    s.on_ack(2)
    s.next_chunk()
    s.on_ack(4)                             # acked before the end was taken
    assert s.take_end() is True
    assert s.state == DONE                  # nothing left to drain


def test_sender_empty_file_is_done_after_the_end_marker():
    s = SenderState(0)
    assert s.next_chunk() is None
    assert s.take_end() is True
    assert s.state == DONE


def test_sender_limit_models_a_shared_budget():
    s = SenderState(10, chunk_size=4, window=8)
    assert s.next_chunk(limit=3) is None
    assert s.sent == 0                      # nothing handed out
    assert s.next_chunk(limit=4) == (0, 4)
    assert s.next_chunk(limit=100) == (4, 4)
    s.on_ack(8)
    assert s.next_chunk(limit=2) == (8, 2)  # the last chunk is short enough


def test_sender_duplicate_ack_is_harmless():
    s = SenderState(10, chunk_size=5, window=10)
    s.next_chunk()
    assert s.on_ack(5) == 5
    assert s.on_ack(5) == 0
    assert s.acked == 5


@pytest.mark.parametrize("ack, words", [
    (3, "went backwards from 4 to 3"),
    (9, "acknowledgement of 9 bytes, but only 8 were sent"),
    ("8", "not an int"),
    (None, "not an int"),
    (True, "not an int"),
    (8.0, "not an int"),
])
def test_sender_rejects_bad_acks(ack, words):
    s = SenderState(100, chunk_size=4, window=8, what="send of '/x'")
    s.next_chunk()
    s.next_chunk()
    s.on_ack(4)
    with pytest.raises(LocalProtocolError) as ei:
        s.on_ack(ack)
    assert words in str(ei.value)
    assert str(ei.value).startswith("send of '/x': ")
    assert s.state == ABORTED and s.finished
    assert words in s.error
    # after the abort: nothing is handed out and acks are ignored
    assert s.next_chunk() is None and s.take_end() is False
    assert s.on_ack(8) == 0


def test_sender_abort():
    s = SenderState(100, chunk_size=4, window=8)
    s.next_chunk()
    s.abort("receiver went away")
    assert s.state == ABORTED and s.error == "receiver went away"
    s.abort("second reason")
    assert s.error == "receiver went away"   # the first reason sticks
    assert s.next_chunk() is None and s.take_end() is False
    assert s.on_ack(4) == 0


def test_sender_abort_after_done_stays_done():
    s = SenderState(2, chunk_size=2, window=2)
    s.next_chunk()
    s.take_end()
    s.on_ack(2)
    s.abort("late")
    assert s.state == DONE and s.error is None


# -- receiver ------------------------------------------------------------------------------
def test_receiver_acks_every_half_window_and_on_the_last_byte():
    r = ReceiverState(11, window=8)
    assert r.ack_every == 4
    acks = [r.on_chunk(i, 1) for i in range(11)]
    assert acks == [None, None, None, 4, None, None, None, 8, None, None, 11]
    r.on_end(11)
    assert r.state == COMPLETE and r.complete


def test_receiver_custom_ack_every():
    r = ReceiverState(6, window=4, ack_every=1)
    assert [r.on_chunk(i, 1) for i in range(6)] == [1, 2, 3, 4, 5, 6]


def test_receiver_big_chunks_ack_at_once():
    r = ReceiverState(20, window=10)
    assert r.on_chunk(0, 3) is None
    assert r.on_chunk(3, 7) == 10
    assert r.on_chunk(10, 10) == 20


def test_receiver_empty_file():
    r = ReceiverState(0)
    r.on_end(0)
    assert r.complete


@pytest.mark.parametrize("feed, words", [
    ([(0, 2), (3, 1)], "out-of-order chunk at offset 3, expected offset 2"),   # gap
    ([(0, 2), (0, 2)], "out-of-order chunk at offset 0, expected offset 2"),   # repeat
    ([(2, 2)], "out-of-order chunk at offset 2, expected offset 0"),          # skipped start
    ([(0, 2), (2, 0)], "empty chunk at offset 2"),
    ([(0, 8), (8, 3)], "overrun: chunk [8, 11) runs past the expected size of 10 bytes"),
    ([(0, 5), (5, 4)], "sender exceeded the window: 9 bytes unacknowledged, window 8"),
    ([(0, "2")], "must be ints"),
])
def test_receiver_rejects_bad_chunks(feed, words):
    r = ReceiverState(10, window=8, ack_every=8, what="fetch of '/f'")
    with pytest.raises(LocalProtocolError) as ei:
        for offset, length in feed:
            r.on_chunk(offset, length)
    assert words in str(ei.value)
    assert str(ei.value).startswith("fetch of '/f': ")
    assert r.state == FAILED
    # sticky: every later call raises the very same error
    with pytest.raises(LocalProtocolError) as again:
        r.on_chunk(r.received, 1)
    assert again.value is ei.value
    with pytest.raises(LocalProtocolError) as again:
        r.on_end(10)
    assert again.value is ei.value


@pytest.mark.parametrize("received, end, words", [
    (6, 6, "short file: sender ended at 6 of the 10 bytes announced"),
    (10, 12, "overrun: sender ended at 12 bytes, 10 were announced"),
    (6, 10, "short file: end marker after 6 of 10 bytes"),
    (0, 10, "short file: end marker after 0 of 10 bytes"),
    (10, "10", "not an int"),
])
def test_receiver_final_size_check(received, end, words):
    r = ReceiverState(10, window=10)
    for i in range(received):
        r.on_chunk(i, 1)
    with pytest.raises(LocalProtocolError) as ei:
        r.on_end(end)
    assert words in str(ei.value)
    assert r.state == FAILED and not r.complete


def test_receiver_rejects_anything_after_the_end():
    r = ReceiverState(2, window=2)
    r.on_chunk(0, 2)
    r.on_end(2)
    with pytest.raises(LocalProtocolError, match="chunk after the end marker"):
        r.on_chunk(2, 1)
    r2 = ReceiverState(0)
    r2.on_end(0)
    with pytest.raises(LocalProtocolError, match="end marker after the end marker"):
        r2.on_end(0)


def test_receiver_fail_from_outside():
    r = ReceiverState(10)
    err = r.fail("write failed")
    assert isinstance(err, LocalProtocolError) and "write failed" in str(err)
    assert r.fail("other") is err
    with pytest.raises(LocalProtocolError) as ei:
        r.on_chunk(0, 1)
    assert ei.value is err


def test_receiver_rejects_every_misordering_of_the_chunks():
    """Of all arrival orders of five chunks only the one they were sent in
    is accepted; every other order fails at its first misplaced chunk."""
    chunks = [(i * 3, 3) for i in range(5)]
    accepted = 0
    for order in itertools.permutations(chunks):
        r = ReceiverState(15, window=15)
        try:
            for offset, length in order:
                r.on_chunk(offset, length)
            r.on_end(15)
        except LocalProtocolError as exc:
            first_bad = next(c for c, want in zip(order, chunks) if c != want)
            assert "out-of-order chunk at offset %d" % first_bad[0] in str(exc)
        else:
            assert list(order) == chunks
            accepted += 1
    assert accepted == 1


# -- both together -----------------------------------------------------------------------
def _run(size: int, chunk: int, window: int, ack_every: Optional[int] = None,
         rng: Optional[random.Random] = None
         ) -> Tuple[SenderState, ReceiverState, List[Tuple[int, int]]]:
    """Simulate one transfer over two FIFO queues, picking the next
    enabled action at random (or always the first when rng is None).
    Returns both states and the (offset, length) chunks delivered."""
    s = SenderState(size, chunk, window)
    r = ReceiverState(size, window, ack_every)
    data: List[tuple] = []
    acks: List[int] = []
    got: List[Tuple[int, int]] = []
    while True:
        actions = []
        if s.wants() or (s.state == SENDING and s.sent == size):
            actions.append("send")
        if data:
            actions.append("deliver")
        if acks:
            actions.append("ack")
        if not actions:
            return s, r, got
        act = rng.choice(actions) if rng else actions[0]
        if act == "send":
            c = s.next_chunk()
            data.append(("chunk",) + c if c else ("end", size))
            if not c:
                assert s.take_end()
        elif act == "deliver":
            kind, a, *b = data.pop(0)
            if kind == "chunk":
                n = r.on_chunk(a, b[0])
                got.append((a, b[0]))
                if n is not None:
                    acks.append(n)
            else:
                r.on_end(a)
        else:
            s.on_ack(acks.pop(0))
        assert 0 <= s.in_flight <= window
        assert r.received - r.acked <= window


def _tiles(chunks: List[Tuple[int, int]], size: int) -> bool:
    """The chunks cover [0, size) in order, without gaps or overlaps."""
    pos = 0
    for offset, length in chunks:
        if offset != pos or length <= 0:
            return False
        pos += length
    return pos == size


@pytest.mark.parametrize("size, chunk, window", [
    (0, 1, 1), (1, 1, 1), (7, 1, 1), (7, 1, 3), (7, 2, 3), (64, 4, 16), (65, 4, 16),
    (1000, 7, 50), (CHUNK_SIZE * 3 + 5, CHUNK_SIZE, WINDOW),
])
def test_transfer_completes_in_random_interleavings(size, chunk, window):
    rng = random.Random(size * 31 + chunk * 7 + window)
    for _ in range(20):
        s, r, got = _run(size, chunk, window, rng=rng)
        assert s.state == DONE and r.state == COMPLETE
        assert _tiles(got, size)


def test_byte_at_a_time_with_a_one_byte_window():
    s, r, got = _run(9, 1, 1)
    assert s.state == DONE and r.complete and got == [(i, 1) for i in range(9)]
    assert s.acked == 9


def _explore(size: int, chunk: int, window: int, ack_every: Optional[int]) -> int:
    """Depth-first search over *every* interleaving of sending, delivering
    data and delivering acks; returns the number of distinct states. Every
    state keeps the window; every dead end is a finished transfer."""
    start = (SenderState(size, chunk, window), ReceiverState(size, window, ack_every), (), ())
    seen = set()
    stack = [start]
    finals = 0
    while stack:
        s, r, data, acks = stack.pop()
        key = (s.sent, s.acked, s.state, r.received, r.acked, r.state, data, acks)
        if key in seen:
            continue
        seen.add(key)
        assert s.in_flight <= window and r.received - r.acked <= window
        moved = False
        if s.wants() or (s.state == SENDING and s.sent == size):
            s2, r2 = copy.deepcopy((s, r))
            c = s2.next_chunk()
            if c is None:
                assert s2.take_end()
            stack.append((s2, r2, data + ((c or (size, -1)),), acks))
            moved = True
        if data:
            s2, r2 = copy.deepcopy((s, r))
            (a, b), rest = data[0], data[1:]
            acks2 = acks
            if b == -1:
                r2.on_end(a)
            else:
                n = r2.on_chunk(a, b)
                if n is not None:
                    acks2 = acks + (n,)
            stack.append((s2, r2, rest, acks2))
            moved = True
        if acks:
            s2, r2 = copy.deepcopy((s, r))
            s2.on_ack(acks[0])
            stack.append((s2, r2, data, acks[1:]))
            moved = True
        if not moved:
            assert s.state == DONE and r.state == COMPLETE, (s, r)
            finals += 1
    assert finals >= 1
    return len(seen)


@pytest.mark.parametrize("size, chunk, window, ack_every", [
    (0, 1, 1, None), (5, 1, 1, None), (6, 1, 2, None), (6, 1, 3, 1), (7, 2, 4, None),
    (7, 2, 4, 1), (8, 3, 5, 2), (9, 1, 4, 3), (12, 1, 6, 1), (16, 2, 8, None),
])
def test_every_interleaving_completes(size, chunk, window, ack_every):
    assert _explore(size, chunk, window, ack_every) > 0


def test_receiver_with_a_smaller_window_catches_the_sender():
    """If the two sides disagree on the window the receiver notices."""
    s = SenderState(10, chunk_size=3, window=6)
    r = ReceiverState(10, window=4, ack_every=4)
    with pytest.raises(LocalProtocolError, match="exceeded the window"):
        while True:
            c = s.next_chunk()
            assert c is not None
            r.on_chunk(*c)


def test_states_have_readable_reprs():
    assert "SENDING" in repr(SenderState(3)) and RECEIVING in repr(ReceiverState(3))
