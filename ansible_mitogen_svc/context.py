"""The router, contexts, receivers and call results.

Runs on: controller and targets (shipped).

Theory of operation
-------------------
A :class:`Router` is one context's view of the tree: its id range and route
table (:mod:`router`), its streams (one parent, any number of children) and
its handle table. Messages are delivered to *handles*: small integers mapped
to callbacks that run on the broker thread. Well-known handles
(:data:`~wire.HANDLE_CALL_SERVICE`, ...) are registered by a
:class:`~service.Pool`; replies go to handles allocated per call.

A call allocates a :class:`Receiver` whose ``respondent`` is the context
called. When the stream leading to that context disconnects, the router
sends every such receiver a DEAD notice, so a caller never waits on a dead
context for longer than it takes the broker to see EOF.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from .broker import Broker, Stream
from .errors import (BrokenError, CallError, ClosedError, LoadError,
                     RoutingError, TimeoutError, WouldBlock)
from .policy import CHILD, PARENT, SELF, Caller
from .protocol import DEFAULT_MAX_BODY
from .router import FORWARD, LOCAL, REFUSE, ROOT_RANGE, Decision, IdRange, RouteTable
from .wire import (FIRST_DYNAMIC_HANDLE, FLAG_DEAD, FLAG_ERROR, HANDLE_CALL_FUNCTION,
                   HANDLE_CALL_SERVICE, HANDLE_SHUTDOWN, MAX_HANDLE, Message)

__all__ = ["Router", "Context", "Receiver", "PendingCall", "call", "call_async",
           "DEFAULT_CALL_TIMEOUT"]

LOG = logging.getLogger("ansible_mitogen_svc.context")

# Default bound on a blocking call. Ansible tasks may legitimately run for
# a long time (package upgrades), so this is generous; a dead peer is
# noticed immediately through EOF, not through this timeout.
DEFAULT_CALL_TIMEOUT = 3600.0

Handler = Callable[[Message, Caller], None]


class _Handle:
    __slots__ = ("fn", "respondent", "persist")

    def __init__(self, fn: Handler, respondent: Optional[int], persist: bool) -> None:
        self.fn = fn
        self.respondent = respondent
        self.persist = persist


class Router:
    """One context's message router.

    Args:
        broker: the broker to use; a new one is started when omitted and
            stopped by :meth:`shutdown`.
        ids: this context's id range (the controller owns all ids).
        name: for logs.
        max_body: incoming frame size limit for streams added later.
    """

    def __init__(self, broker: Optional[Broker] = None, ids: IdRange = ROOT_RANGE,
                 name: str = "controller", max_body: int = DEFAULT_MAX_BODY) -> None:
        self._own_broker = broker is None
        self.broker = broker if broker is not None else Broker(name + ".broker").start()
        self.table = RouteTable(ids)
        self.name = name
        self.max_body = max_body
        self._lock = threading.Lock()
        self._handles: Dict[int, _Handle] = {}
        self._handle_seq = itertools.count(FIRST_DYNAMIC_HANDLE)
        self._streams: Dict[int, Stream] = {}
        self._names: Dict[int, str] = {ids.lo: name}
        # Requests forwarded down a child stream and not yet answered:
        # stream id -> {(src, reply_to): dst}. When that stream goes away
        # their callers (elsewhere in the tree) get a DEAD notice from us.
        self._forwarded: Dict[int, Dict[Tuple[int, int], int]] = {}
        self.parent: Optional[Context] = None
        self.dead_letters = 0
        self.on_parent_lost: Callable[[], None] = lambda: None

    @property
    def my_id(self) -> int:
        return self.table.my_id

    def __repr__(self) -> str:
        return "Router(%r, id=%d)" % (self.name, self.my_id)

    # -- streams --------------------------------------------------------------
    def attach_parent(self, stream: Stream, parent_id: int) -> "Context":
        """Make ``stream`` our route to everything outside our range."""
        with self._lock:
            self.table.set_parent(stream.id)
            self._streams[stream.id] = stream
        self._wire(stream)
        self.parent = Context(self, parent_id, "parent")
        return self.parent

    def attach_child(self, stream: Stream, ids: IdRange, name: str,
                     trusted: bool = False) -> "Context":
        """Route ``ids`` down ``stream``; returns the child's Context."""
        with self._lock:
            self.table.add_child(stream.id, ids, trusted)
            self._streams[stream.id] = stream
            self._names[ids.lo] = name
        self._wire(stream)
        return Context(self, ids.lo, name)

    def allocate(self, leaf: bool) -> IdRange:
        with self._lock:
            return self.table.allocate(leaf)

    def _wire(self, stream: Stream) -> None:
        stream.on_message = self._on_message
        stream.on_disconnect = self._on_disconnect
        self.broker.add_stream(stream)

    def stream_to(self, context_id: int) -> Optional[Stream]:
        """The stream a message for ``context_id`` would leave on."""
        with self._lock:
            d = self.table.decide(context_id, None)
            return self._streams.get(d.stream_id) if d.action == FORWARD else None

    # -- handles ----------------------------------------------------------------
    def add_handler(self, fn: Handler, handle: Optional[int] = None,
                    respondent: Optional[int] = None, persist: bool = True) -> int:
        """Register ``fn(msg, caller)`` to run on the broker thread for
        messages to ``handle`` (allocated when None). With ``respondent``
        set, ``fn`` gets a DEAD notice if that context's route goes away."""
        with self._lock:
            if handle is None:
                handle = next(self._handle_seq)
                if handle > MAX_HANDLE:  # 4 billion calls: wrap around
                    self._handle_seq = itertools.count(FIRST_DYNAMIC_HANDLE)
                    handle = next(self._handle_seq)
            self._handles[handle] = _Handle(fn, respondent, persist)
        return handle

    def del_handler(self, handle: int) -> None:
        with self._lock:
            self._handles.pop(handle, None)

    # -- sending ----------------------------------------------------------------
    def send(self, msg: Message) -> None:
        """Send a message originated here. Raises RoutingError when there is
        no route, ClosedError when the route's stream is closed."""
        self._route(msg, None)

    def _route(self, msg: Message, ingress: Optional[Stream]) -> None:
        with self._lock:
            d = self.table.decide(msg.dst, ingress.id if ingress else None)
            if d.action == REFUSE and ingress is not None:
                d = self._reply_to_trusted(msg, ingress, d)
            stream = self._streams.get(d.stream_id) if d.action == FORWARD else None
            if ingress is not None:
                self._track_forwarded(msg, ingress, d.stream_id if stream is not None else None)
        if d.action == LOCAL:
            self._deliver(msg, ingress)
        elif stream is not None:
            try:
                stream.send(msg)
            except ClosedError as exc:
                self._bounce(msg, "broken", "route to context %d via %s is closed"
                             % (msg.dst, stream.name), ingress)
                if ingress is None:
                    raise BrokenError(str(exc)) from exc
        else:
            reason = d.reason or "no stream for route to context %d" % msg.dst
            self._bounce(msg, "routing", reason, ingress)
            if ingress is None and not msg.reply_to:
                raise RoutingError("%s: %s" % (self.name, reason))

    def _reply_to_trusted(self, msg: Message, ingress: Stream, d: Decision) -> Decision:
        # Called with self._lock held. A trusted child (a controller worker
        # attached to the mux) may call a sibling (an agent); that agent's
        # reply, and only a reply to a request we forwarded to it, may flow
        # back to the trusted child.
        if (msg.dst, msg.handle) not in self._forwarded.get(ingress.id, {}):
            return d
        route = self.table.child_for(msg.dst)
        if route is None or not route.trusted:
            return d
        return Decision(FORWARD, route.stream_id)

    def _track_forwarded(self, msg: Message, ingress: Stream, egress: Optional[int]) -> None:
        # Called with self._lock held, for messages that arrived on a stream.
        answered = self._forwarded.get(ingress.id)
        if answered:
            answered.pop((msg.dst, msg.handle), None)
        if (egress is not None and msg.reply_to and not msg.flags & FLAG_DEAD
                and egress != self.table.parent_stream):
            self._forwarded.setdefault(egress, {})[(msg.src, msg.reply_to)] = msg.dst

    def _bounce(self, msg: Message, kind: str, reason: str, ingress: Optional[Stream]) -> None:
        """Tell the sender its message could not be delivered."""
        self.dead_letters += 1
        if msg.flags & FLAG_DEAD or not msg.reply_to:
            LOG.debug("%s: dropped %r: %s", self.name, msg, reason)
            return
        notice = Message.encoded(msg.src, self.my_id, msg.reply_to,
                                 {"kind": kind, "reason": reason}, flags=FLAG_DEAD)
        if msg.src == self.my_id:
            self._deliver(notice, None)
        else:
            try:
                self._route(notice, None)
            except Exception:
                LOG.debug("%s: could not bounce %r", self.name, msg)

    # -- receiving ----------------------------------------------------------------
    def _on_message(self, stream: Stream, msg: Message) -> None:
        with self._lock:
            reason = self.table.check_ingress(msg.src, msg.auth, stream.id)
        if reason is not None:
            LOG.error("%s: closing %s: %s", self.name, stream.name, reason)
            if self.broker.on_broker_thread:
                # At once: frames after this one in the same read must not
                # be routed while a deferred close waits its turn.
                self.broker._disconnect(stream, RoutingError(reason))
            else:
                self.broker.close_stream(stream, RoutingError(reason))
            return
        self._route(msg, stream)

    def _caller(self, msg: Message, ingress: Optional[Stream]) -> Caller:
        if ingress is None:
            return Caller(msg.src, msg.auth, SELF, self.name)
        with self._lock:
            if ingress.id == self.table.parent_stream:
                return Caller(msg.src, msg.auth, PARENT, ingress.name)
            route = self.table.child_of_stream(ingress.id)
        ids = (route.ids.lo, route.ids.hi) if route else ()
        return Caller(msg.src, msg.auth, CHILD, ingress.name, ids,
                      bool(route and route.trusted))

    def _deliver(self, msg: Message, ingress: Optional[Stream]) -> None:
        with self._lock:
            h = self._handles.get(msg.handle)
            if h is not None and not h.persist:
                del self._handles[msg.handle]
        if h is None:
            self._bounce(msg, "routing", "context %d (%s) has no handle %d"
                         % (self.my_id, self.name, msg.handle), ingress)
            return
        try:
            h.fn(msg, self._caller(msg, ingress))
        except Exception:
            LOG.exception("%s: handler for %r failed", self.name, msg)

    def _on_disconnect(self, stream: Stream, exc: Optional[BaseException]) -> None:
        with self._lock:
            self._streams.pop(stream.id, None)
            was_parent = stream.id == self.table.parent_stream
            route = self.table.remove_stream(stream.id)
            lost = (lambda i: i not in self.table.ids) if was_parent else (
                (lambda i: i in route.ids) if route else (lambda i: False))
            victims = [(k, h) for k, h in self._handles.items()
                       if h.respondent is not None and lost(h.respondent)]
            forwarded = self._forwarded.pop(stream.id, {})
        reason = "%s disconnected" % stream.name
        if exc is not None:
            reason += ": %s" % exc
        for (src, reply_to), dst in forwarded.items():
            notice = Message.encoded(src, self.my_id, reply_to,
                                     {"kind": "broken", "reason": "context %d: %s" % (dst, reason)},
                                     flags=FLAG_DEAD)
            try:
                self._route(notice, None)
            except Exception as e:
                LOG.debug("%s: DEAD notice to context %d not sent: %s", self.name, src, e)
        for handle, h in victims:
            notice = Message.encoded(self.my_id, h.respondent or 0, handle,
                                     {"kind": "broken", "reason": reason}, flags=FLAG_DEAD)
            try:
                h.fn(notice, Caller(self.my_id, self.my_id, SELF, stream.name))
            except Exception:
                LOG.exception("%s: DEAD notice handler failed", self.name)
        if was_parent:
            LOG.debug("%s: parent stream lost (%s)", self.name, exc)
            self.on_parent_lost()

    # -- lifetime -----------------------------------------------------------------
    def context(self, context_id: int, name: Optional[str] = None) -> "Context":
        return Context(self, context_id, name or self._names.get(context_id, str(context_id)))

    def shutdown(self) -> None:
        """Close every stream (children see EOF and exit) and, if we own
        the broker, stop it."""
        self.broker.shutdown()

    def join(self, timeout: float = 10.0) -> None:
        self.broker.join(timeout)


class Receiver:
    """A handle plus a queue: collects messages sent to it.

    Args:
        router: where to register.
        respondent: context whose disappearance should wake us with DEAD.
    """

    def __init__(self, router: Router, respondent: Optional[int] = None) -> None:
        self.router = router
        self._cond = threading.Condition()
        self._queue: Deque[Message] = collections.deque()
        self.closed = False
        self.handle = router.add_handler(self._put, respondent=respondent)

    def _put(self, msg: Message, caller: Caller) -> None:
        with self._cond:
            self._queue.append(msg)
            self._cond.notify()

    def ready(self) -> bool:
        return bool(self._queue)

    def wait_ready(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a message without taking
        it; True when one is there."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def get_nowait(self) -> Message:
        """Raises WouldBlock when nothing has arrived."""
        with self._cond:
            if not self._queue:
                raise WouldBlock("no message on handle %d yet" % self.handle)
            return self._queue.popleft()

    def wait(self, timeout: float) -> Message:
        """Block up to ``timeout`` seconds. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no reply on handle %d within %.1fs" % (self.handle, timeout))
                self._cond.wait(left)
            return self._queue.popleft()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.router.del_handler(self.handle)


def decode_reply(msg: Message, what: str) -> Any:
    """Turn a reply message into a value or raise the error it carries."""
    try:
        data = msg.data()
    except LoadError as exc:
        raise CallError("ansible_mitogen_svc.errors.LoadError",
                        "%s: undecodable reply: %s" % (what, exc)) from exc
    if msg.flags & FLAG_DEAD:
        reason = data.get("reason", "?") if isinstance(data, dict) else str(data)
        if isinstance(data, dict) and data.get("kind") == "routing":
            raise RoutingError("%s: %s" % (what, reason))
        raise BrokenError("%s: %s" % (what, reason))
    if msg.flags & FLAG_ERROR:
        if not isinstance(data, dict):
            data = {"type": "?", "message": repr(data)}
        cls = CallError
        if data.get("refused"):
            from .errors import RefusedError
            cls = RefusedError
        raise cls(str(data.get("type", "?")), str(data.get("message", "")),
                  str(data.get("traceback", "")))
    return data


class PendingCall:
    """The result of a call that may not have arrived yet."""

    def __init__(self, receiver: Receiver, what: str) -> None:
        self._receiver = receiver
        self.what = what
        self._done = False
        self._result: Tuple[bool, Any] = (False, None)

    def ready(self) -> bool:
        return self._done or self._receiver.ready()

    def wait_ready(self, timeout: float) -> bool:
        """True once the reply is there (without taking it); False when
        it did not come within ``timeout`` seconds."""
        return self._done or self._receiver.wait_ready(timeout)

    def _finish(self, msg: Message) -> Any:
        self._receiver.close()
        self._done = True
        try:
            self._result = (True, decode_reply(msg, self.what))
        except Exception as exc:
            self._result = (False, exc)
        return self._value()

    def _value(self) -> Any:
        ok, value = self._result
        if ok:
            return value
        raise value

    def get(self, timeout: float = DEFAULT_CALL_TIMEOUT) -> Any:
        """Wait for the reply; return its value or raise CallError,
        RefusedError, BrokenError, RoutingError or TimeoutError."""
        if self._done:
            return self._value()
        try:
            msg = self._receiver.wait(timeout)
        except TimeoutError as exc:
            self._receiver.close()
            raise TimeoutError("%s: no reply within %.1fs" % (self.what, timeout)) from exc
        return self._finish(msg)

    def get_nowait(self) -> Any:
        """Like :meth:`get` but raises WouldBlock when not ready yet."""
        if self._done:
            return self._value()
        return self._finish(self._receiver.get_nowait())


class Context:
    """A handle on one context in the tree (possibly this one)."""

    def __init__(self, router: Router, context_id: int, name: str) -> None:
        self.router = router
        self.context_id = context_id
        self.name = name

    def __repr__(self) -> str:
        return "Context(%d, %r)" % (self.context_id, self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Context) and other.context_id == self.context_id and \
            other.router is self.router

    def __hash__(self) -> int:
        return hash(self.context_id)

    def send_call(self, handle: int, body: Any, what: str) -> PendingCall:
        router = self.router
        recv = Receiver(router, respondent=self.context_id)
        msg = Message.encoded(self.context_id, router.my_id, handle, body,
                              reply_to=recv.handle)
        try:
            router.send(msg)
        except Exception:
            recv.close()
            raise
        return PendingCall(recv, what)

    def call_service_async(self, service: str, method: str, **kwargs: Any) -> PendingCall:
        """Start ``service.method(**kwargs)`` in this context."""
        return self.send_call(HANDLE_CALL_SERVICE, (service, method, kwargs),
                              "%s: %s.%s()" % (self.name, service, method))

    def call_service(self, service: str, method: str, **kwargs: Any) -> Any:
        return self.call_service_async(service, method, **kwargs).get()

    def call_async(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> PendingCall:
        """Start ``func(*args, **kwargs)`` in this context. ``func`` must be a
        module-level function in a module shipped to that context."""
        mod, name = func.__module__, func.__qualname__
        if not mod or "<" in name or "." in name:
            raise ValueError("%r is not a module-level function" % (func,))
        return self.call_function_async(mod, name, *args, **kwargs)

    def call_function_async(self, module: str, function: str, *args: Any,
                            **kwargs: Any) -> PendingCall:
        """Like :meth:`call_async`, naming the function instead of passing
        it: for callers that do not import the module (it may be known
        under another name here than on the target)."""
        return self.send_call(HANDLE_CALL_FUNCTION, (module, function, args, kwargs),
                              "%s: %s.%s()" % (self.name, module, function))

    def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` there and return its result."""
        return self.call_async(func, *args, **kwargs).get()

    def shutdown(self) -> None:
        """Ask the context to exit (fire and forget)."""
        self.router.send(Message.encoded(self.context_id, self.router.my_id,
                                         HANDLE_SHUTDOWN, "shutdown requested"))


def call_async(context: Context, service: str, method: str, **kwargs: Any) -> PendingCall:
    """Start ``service.method(**kwargs)`` in ``context``; non-blocking."""
    return context.call_service_async(service, method, **kwargs)


def call(context: Context, service: str, method: str, **kwargs: Any) -> Any:
    """Call ``service.method(**kwargs)`` in ``context`` and wait (up to
    DEFAULT_CALL_TIMEOUT) for the result.

    Raises:
        RefusedError: unknown service/method, not exposed, policy refusal or
            a bad argument.
        CallError: the method raised; carries remote type and traceback.
        BrokenError: the context died or its stream broke during the call.
        RoutingError: no route to the context.
    """
    return context.call_service_async(service, method, **kwargs).get()
