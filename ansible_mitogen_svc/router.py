"""Routing table, id ranges and the source/auth checks.

Runs on: controller and targets (shipped). Sans-IO: decisions only; the
:class:`~ansible_mitogen_svc.context.Router` acts on them.

Theory of operation
-------------------
Every context owns a contiguous range of ids ``[lo, hi)`` granted by its
parent when it was started; its own id is ``lo``. It grants sub-ranges of
its range to the children it starts: agents and chained agents (which start
children of their own) get a big block, forked task children (leaves) get
one id. The root (the controller) owns ``[0, 2**64)``.

Routing a message with destination ``dst`` needs no route announcements:

* ``dst == lo``                 -> deliver locally;
* ``dst`` inside a child range  -> forward down that child's stream;
* ``dst`` outside ``[lo, hi)``  -> forward up the parent stream;
* otherwise                     -> the context is gone: refuse.

Checks on a message arriving on stream ``s`` (before anything else):

* from a child stream: ``src`` and ``auth`` must both lie in that child's
  range (a child cannot impersonate its parent, a sibling or the root);
* from the parent stream: ``src`` and ``auth`` must lie *outside* our range
  (nobody upstream may speak for our subtree).

Siblings: a message from one child's stream to another child's subtree is
refused unless the ingress child is marked ``trusted`` (the controller's
own worker processes). So one target can never reach another target, even
through a compromised agent.
"""
from __future__ import annotations

import bisect
import collections
from typing import Dict, List, Optional

__all__ = ["IdRange", "ChildRoute", "Decision", "RouteTable",
           "ROOT_RANGE", "LOCAL", "FORWARD", "REFUSE"]

LOCAL, FORWARD, REFUSE = "local", "forward", "refuse"


class IdRange(collections.namedtuple("_IdRange", "lo hi")):
    """Ids ``lo <= i < hi``. (Named tuples, not dataclasses, keep the
    shipped code quick to import; see docs/design.md.)"""

    __slots__ = ()

    def __contains__(self, ident: object) -> bool:
        return isinstance(ident, int) and self.lo <= ident < self.hi

    @property
    def size(self) -> int:
        return int(self.hi - self.lo)


ROOT_RANGE = IdRange(0, 2 ** 64)

# A context with a range of size S grants children that may start children
# of their own blocks of S >> PARENT_SHIFT ids. The root uses 24 bits
# (16 million agents before an id is reused); below it 8 bits are enough
# (256 live chained agents/fork parents per agent) and leave depth for
# controller -> agent -> sudo agent -> sudo agent -> forked children.
ROOT_SHIFT = 24
PARENT_SHIFT = 8


ChildRoute = collections.namedtuple("ChildRoute", "stream_id ids trusted", defaults=(False,))

# action is LOCAL, FORWARD or REFUSE
Decision = collections.namedtuple("Decision", "action stream_id reason", defaults=(None, ""))


class RouteTable:
    """Routes of one context. Not thread-safe: the broker thread owns it."""

    def __init__(self, ids: IdRange) -> None:
        self.ids = ids
        self.parent_stream: Optional[int] = None
        self._los: List[int] = []
        self._children: List[ChildRoute] = []
        self._by_stream: Dict[int, ChildRoute] = {}
        self._cursor = ids.lo + 1

    @property
    def my_id(self) -> int:
        return int(self.ids.lo)

    # -- table maintenance -------------------------------------------------
    def set_parent(self, stream_id: int) -> None:
        self.parent_stream = stream_id

    def add_child(self, stream_id: int, ids: IdRange, trusted: bool = False) -> ChildRoute:
        if ids.lo <= self.ids.lo or ids.hi > self.ids.hi:
            raise ValueError("child range %r outside %r" % (ids, self.ids))
        i = bisect.bisect_left(self._los, ids.lo)
        for j in (i - 1, i):
            if 0 <= j < len(self._children):
                other = self._children[j].ids
                if other.lo < ids.hi and ids.lo < other.hi:
                    raise ValueError("child range %r overlaps %r" % (ids, other))
        route = ChildRoute(stream_id, ids, trusted)
        self._los.insert(i, ids.lo)
        self._children.insert(i, route)
        self._by_stream[stream_id] = route
        return route

    def remove_stream(self, stream_id: int) -> Optional[ChildRoute]:
        if stream_id == self.parent_stream:
            self.parent_stream = None
            return None
        route = self._by_stream.pop(stream_id, None)
        if route is not None:
            i = self._los.index(route.ids.lo)
            del self._los[i]
            del self._children[i]
        return route

    def child_for(self, ident: int) -> Optional[ChildRoute]:
        i = bisect.bisect_right(self._los, ident) - 1
        if i >= 0 and ident in self._children[i].ids:
            return self._children[i]
        return None

    def child_of_stream(self, stream_id: int) -> Optional[ChildRoute]:
        return self._by_stream.get(stream_id)

    def children(self) -> List[ChildRoute]:
        return list(self._children)

    # -- id allocation -----------------------------------------------------
    def allocate(self, leaf: bool) -> IdRange:
        """Pick a free block for a new child: one id for a leaf, a big
        aligned block for a child that may start children itself.

        Raises:
            RoutingError: the range is exhausted (practically impossible).
        """
        if leaf:
            size = 1
        else:
            shift = ROOT_SHIFT if self.ids == ROOT_RANGE else PARENT_SHIFT
            size = max(1, self.ids.size >> shift)
        for start in (self._cursor, self.ids.lo + 1):
            lo = self._fit(start, size)
            if lo is not None:
                self._cursor = lo + size
                return IdRange(lo, lo + size)
        from .errors import RoutingError
        raise RoutingError("context %d: id range %r exhausted" % (self.my_id, self.ids))

    def _fit(self, start: int, size: int) -> Optional[int]:
        lo = -(-start // size) * size  # align up
        while lo + size <= self.ids.hi:
            clash = self._first_overlap(lo, lo + size)
            if clash is None:
                return lo
            lo = -(-clash.hi // size) * size
        return None

    def _first_overlap(self, lo: int, hi: int) -> Optional[IdRange]:
        i = bisect.bisect_right(self._los, lo) - 1
        for j in (i, i + 1):
            if 0 <= j < len(self._children):
                r = self._children[j].ids
                if r.lo < hi and lo < r.hi:
                    return IdRange(r.lo, r.hi)
        k = bisect.bisect_left(self._los, lo)
        if k < len(self._children) and self._children[k].ids.lo < hi:
            found = self._children[k].ids
            return IdRange(found.lo, found.hi)
        return None

    # -- decisions ---------------------------------------------------------
    def check_ingress(self, src: int, auth: int, stream_id: int) -> Optional[str]:
        """Return why a message with this src/auth may not arrive on
        ``stream_id``, or None when it may."""
        if stream_id == self.parent_stream:
            if src in self.ids or auth in self.ids:
                return "parent stream sent src=%d auth=%d inside our own range" % (src, auth)
            return None
        route = self._by_stream.get(stream_id)
        if route is None:
            return "stream %d is not routed" % stream_id
        if src not in route.ids or auth not in route.ids:
            return ("child stream owning ids [%d, %d) sent src=%d auth=%d"
                    % (route.ids.lo, route.ids.hi, src, auth))
        return None

    def decide(self, dst: int, ingress: Optional[int]) -> Decision:
        """Where does a message for ``dst`` go? ``ingress`` is the stream it
        arrived on, or None when this context originated it."""
        if dst == self.ids.lo:
            return Decision(LOCAL)
        if dst not in self.ids:
            if self.parent_stream is None:
                return Decision(REFUSE, reason="no route to context %d" % dst)
            if ingress is not None and ingress == self.parent_stream:
                return Decision(REFUSE, reason="context %d is not below context %d"
                                % (dst, self.my_id))
            return Decision(FORWARD, self.parent_stream)
        route = self.child_for(dst)
        if route is None:
            return Decision(REFUSE, reason="context %d is gone or was never started" % dst)
        if ingress is not None and ingress != self.parent_stream and ingress != route.stream_id:
            src_route = self._by_stream.get(ingress)
            if src_route is None or not src_route.trusted:
                return Decision(REFUSE, reason="route from a sibling to context %d refused" % dst)
        return Decision(FORWARD, route.stream_id)
