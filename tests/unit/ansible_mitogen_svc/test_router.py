"""Tests for ansible_mitogen_svc.router.RouteTable: routing decisions,
ingress checks, sibling rules and id allocation."""
from __future__ import annotations

import random

import pytest

from ansible_mitogen_svc.errors import RoutingError
from ansible_mitogen_svc.router import (FORWARD, LOCAL, REFUSE, ROOT_RANGE, IdRange,
                                        RouteTable)

pytestmark = pytest.mark.timeout(30)

PARENT, A, B, W = 10, 11, 12, 13  # stream ids: parent, two agents, a trusted worker


def _agent_table() -> RouteTable:
    """An agent owning [1000, 2000) under a parent, with children A, B, W."""
    t = RouteTable(IdRange(1000, 2000))
    t.set_parent(PARENT)
    t.add_child(A, IdRange(1100, 1200))
    t.add_child(B, IdRange(1200, 1201))
    t.add_child(W, IdRange(1500, 1600), trusted=True)
    return t


def test_id_range_membership() -> None:
    r = IdRange(5, 8)
    assert [i in r for i in (4, 5, 7, 8)] == [False, True, True, False]
    assert r.size == 3
    assert "5" not in r and 5.0 not in r and None not in r
    assert ROOT_RANGE == (0, 2 ** 64) and 2 ** 64 - 1 in ROOT_RANGE


# -- decisions -------------------------------------------------------------------------
@pytest.mark.parametrize("ingress", [None, PARENT, A, B])
def test_own_id_is_local(ingress: object) -> None:
    assert _agent_table().decide(1000, ingress).action == LOCAL


def test_forward_down_to_the_child_owning_the_id() -> None:
    t = _agent_table()
    for dst, stream in ((1100, A), (1150, A), (1199, A), (1200, B), (1555, W)):
        d = t.decide(dst, PARENT)
        assert (d.action, d.stream_id) == (FORWARD, stream)
        d = t.decide(dst, None)
        assert (d.action, d.stream_id) == (FORWARD, stream)


def test_forward_up_for_ids_outside_our_range() -> None:
    t = _agent_table()
    for dst in (0, 999, 2000, 2 ** 64 - 1):
        for ingress in (None, A, B):
            d = t.decide(dst, ingress)
            assert (d.action, d.stream_id) == (FORWARD, PARENT)


def test_refuse_sending_back_up_what_came_down() -> None:
    d = _agent_table().decide(5, PARENT)
    assert d.action == REFUSE and d.reason == "context 5 is not below context 1000"


def test_refuse_ids_of_gone_or_unknown_children() -> None:
    t = _agent_table()
    for dst in (1001, 1099, 1201, 1499, 1600, 1999):
        d = t.decide(dst, PARENT)
        assert d.action == REFUSE
        assert d.reason == "context %d is gone or was never started" % dst


def test_root_has_no_route_outside_its_range() -> None:
    t = RouteTable(IdRange(0, 100))
    d = t.decide(100, None)
    assert d.action == REFUSE and d.reason == "no route to context 100"
    assert RouteTable(ROOT_RANGE).decide(0, None).action == LOCAL


def test_sibling_to_sibling_is_refused() -> None:
    t = _agent_table()
    d = t.decide(1200, A)
    assert d.action == REFUSE and d.reason == "route from a sibling to context 1200 refused"
    assert t.decide(1150, B).action == REFUSE
    assert t.decide(1555, A).action == REFUSE  # a trusted child is no easier to reach


def test_trusted_sibling_may_reach_others() -> None:
    t = _agent_table()
    d = t.decide(1150, W)
    assert (d.action, d.stream_id) == (FORWARD, A)
    assert t.decide(1200, W).stream_id == B


def test_child_may_address_its_own_subtree_and_us() -> None:
    t = _agent_table()
    assert t.decide(1150, A).stream_id == A
    assert t.decide(1000, A).action == LOCAL


# -- ingress ------------------------------------------------------------------------
def test_ingress_from_a_child_must_stay_in_its_range() -> None:
    t = _agent_table()
    assert t.check_ingress(1100, 1100, A) is None
    assert t.check_ingress(1199, 1100, A) is None
    for src, auth in ((1000, 1100), (1100, 1000), (0, 0), (1200, 1200), (1099, 1100),
                      (1100, 1200)):
        reason = t.check_ingress(src, auth, A)
        assert reason == ("child stream owning ids [1100, 1200) sent src=%d auth=%d"
                          % (src, auth))


def test_ingress_from_the_parent_must_stay_outside_our_range() -> None:
    t = _agent_table()
    assert t.check_ingress(0, 0, PARENT) is None
    assert t.check_ingress(2000, 5, PARENT) is None
    for src, auth in ((1000, 0), (0, 1000), (1150, 1150), (1999, 0)):
        assert t.check_ingress(src, auth, PARENT) == (
            "parent stream sent src=%d auth=%d inside our own range" % (src, auth))


def test_ingress_on_an_unknown_stream_is_refused() -> None:
    t = _agent_table()
    assert t.check_ingress(1100, 1100, 99) == "stream 99 is not routed"
    t.remove_stream(A)
    assert t.check_ingress(1100, 1100, A) == "stream %d is not routed" % A


# -- table maintenance ---------------------------------------------------------------
def test_add_child_rejects_bad_ranges() -> None:
    t = _agent_table()
    for bad in (IdRange(1000, 1001), IdRange(900, 1010), IdRange(1900, 2001),
                IdRange(1150, 1160), IdRange(1190, 1210), IdRange(1050, 1700)):
        with pytest.raises(ValueError):
            t.add_child(77, bad)
    assert len(t.children()) == 3
    t.add_child(77, IdRange(1201, 1300))  # adjacent ranges are fine
    assert t.child_for(1201).stream_id == 77


def test_remove_stream() -> None:
    t = _agent_table()
    route = t.remove_stream(A)
    assert route is not None and route.ids == IdRange(1100, 1200)
    assert t.child_for(1150) is None and t.child_of_stream(A) is None
    assert t.decide(1150, PARENT).action == REFUSE
    assert t.remove_stream(A) is None
    assert t.remove_stream(PARENT) is None and t.parent_stream is None
    assert t.decide(5, None).action == REFUSE
    assert [c.stream_id for c in t.children()] == [B, W]


def test_child_lookup_boundaries() -> None:
    t = _agent_table()
    assert t.child_for(1099) is None
    assert t.child_for(1100).stream_id == A and t.child_for(1199).stream_id == A
    assert t.child_for(1200).stream_id == B and t.child_for(1201) is None
    assert t.child_of_stream(W).trusted is True and t.child_of_stream(A).trusted is False


# -- allocation ---------------------------------------------------------------------
def test_root_allocates_aligned_blocks_of_2_40() -> None:
    t = RouteTable(ROOT_RANGE)
    first = t.allocate(leaf=False)
    second = t.allocate(leaf=False)
    assert first == IdRange(2 ** 40, 2 * 2 ** 40)
    assert second == IdRange(2 * 2 ** 40, 3 * 2 ** 40)
    assert 0 not in first


def test_agent_allocates_leaves_and_parents_without_overlap() -> None:
    t = RouteTable(IdRange(2 ** 40, 2 ** 41))
    size = 2 ** 40 >> 8
    rng = random.Random(7)
    seen = []
    for i in range(200):
        leaf = rng.random() < 0.6
        r = t.allocate(leaf=leaf)
        assert r.size == (1 if leaf else size)
        assert r.lo > t.my_id and r.hi <= t.ids.hi
        if not leaf:
            assert r.lo % size == 0
        for other in seen:
            assert r.hi <= other.lo or other.hi <= r.lo, (r, other)
        t.add_child(i, r)
        seen.append(r)


def test_leaf_ids_are_reused_after_remove() -> None:
    t = RouteTable(IdRange(100, 105))
    got = []
    for stream in range(4):
        r = t.allocate(leaf=True)
        t.add_child(stream, r)
        got.append(r.lo)
    assert got == [101, 102, 103, 104]
    with pytest.raises(RoutingError, match=r"context 100: id range .* exhausted"):
        t.allocate(leaf=True)
    t.remove_stream(1)
    assert t.allocate(leaf=True) == IdRange(102, 103)


def test_parent_blocks_are_reused_after_remove() -> None:
    t = RouteTable(IdRange(0, 2 ** 12))  # blocks of 16, the first one holds our id
    blocks = []
    while True:
        try:
            r = t.allocate(leaf=False)
        except RoutingError:
            break
        t.add_child(len(blocks), r)
        blocks.append(r)
    assert len(blocks) == 255 and blocks[0] == IdRange(16, 32)
    assert len({b.lo for b in blocks}) == 255
    t.remove_stream(100)
    assert t.allocate(leaf=False) == blocks[100]


def test_allocation_skips_blocks_still_in_use() -> None:
    t = RouteTable(IdRange(0, 2 ** 12))
    a = t.allocate(leaf=False)
    t.add_child(1, a)
    leaf = t.allocate(leaf=True)  # after the cursor: inside the next free block
    t.add_child(2, leaf)
    b = t.allocate(leaf=False)
    assert b.lo >= leaf.hi and (b.hi <= a.lo or a.hi <= b.lo)
