"""Who may call what: the caller description and the stock policies.

Runs on: controller and targets (shipped). Pure.

A policy gets an explicit :class:`Caller` built by the router from the
stream a message arrived on; it never reads module globals.
"""
from __future__ import annotations

import collections

__all__ = ["Caller", "Policy", "AllowAny", "AllowParents", "AllowChildren",
           "AllowController", "SELF", "PARENT", "CHILD"]

SELF, PARENT, CHILD = "self", "parent", "child"


class Caller(collections.namedtuple(
        "_Caller", "context_id auth_id relation stream_name child_ids trusted",
        defaults=("", (), False))):
    """Where a call came from.

    Attributes:
        context_id: ``src`` of the message.
        auth_id: ``auth`` of the message (checked against the stream).
        relation: SELF (this process), PARENT (arrived on the parent
            stream: the controller or an agent above us) or CHILD (arrived
            on a child's stream: the caller is inside that child's subtree).
        stream_name: name of the ingress stream, for messages.
        child_ids: (lo, hi) id range of the child subtree for CHILD.
        trusted: the ingress child stream is a trusted controller process.
    """

    __slots__ = ()


class Policy:
    """Base class: subclasses say yes or no for one call."""

    def is_authorized(self, caller: Caller) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class AllowAny(Policy):
    """Any context that can route a message to us may call."""

    def is_authorized(self, caller: Caller) -> bool:
        return True


class AllowParents(Policy):
    """Only callers upstream of us (the controller and the agents that
    started us), or this process itself."""

    def is_authorized(self, caller: Caller) -> bool:
        return caller.relation in (SELF, PARENT)


class AllowChildren(Policy):
    """Only contexts below us (our agents, forked children), or this
    process itself."""

    def is_authorized(self, caller: Caller) -> bool:
        return caller.relation in (SELF, CHILD)


class AllowController(Policy):
    """The controller's side of the tree: this process, callers upstream
    of us, and trusted children (the controller's own worker processes
    attached to the mux). Agents and their children are never trusted."""

    def is_authorized(self, caller: Caller) -> bool:
        return caller.relation in (SELF, PARENT) or (caller.relation == CHILD and caller.trusted)
