"""The service framework: Service, @expose, @arg_spec, Pool.

Runs on: controller and targets (shipped).

Theory of operation
-------------------
A :class:`Pool` registers the CALL_SERVICE handle (and, on agents, the
CALL_FUNCTION handle) of a router. The broker thread only queues each call;
``size`` worker threads take calls off the queue and run them:

1. look up the service by name (``"module.Class"``) and the method;
2. refuse unless the method carries ``@expose(policy)`` and the policy
   accepts the :class:`~policy.Caller`;
3. check keyword arguments against the signature and any ``@arg_spec``;
4. call it with :func:`current_call` set for the duration, then reply with
   the return value, or with an error carrying the exception's type,
   message and traceback.

A method may take over replying with ``current_call().defer_reply()``;
:class:`DeduplicatingService` uses that so identical concurrent calls run
the body once and all get the one result.
"""
from __future__ import annotations

import contextvars
import logging
import queue
import threading
import traceback
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from . import codec
from .context import Context, Router
from .errors import CallError, Error, RefusedError
from .policy import AllowParents, Caller, Policy
from .wire import FLAG_ERROR, HANDLE_CALL_FUNCTION, HANDLE_CALL_SERVICE, Message

__all__ = ["Service", "DeduplicatingService", "Pool", "expose", "arg_spec",
           "current_call", "CallInfo", "Responder"]

LOG = logging.getLogger("ansible_mitogen_svc.service")

_EXPOSED = "_msvc_policy"
_SPEC = "_msvc_arg_spec"


def expose(policy: Policy) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make a service method callable by whoever ``policy`` allows. Methods
    without it are unreachable."""
    if not isinstance(policy, Policy):
        raise TypeError("expose() needs a Policy instance, got %r" % (policy,))

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, _EXPOSED, policy)
        return fn
    return deco


def arg_spec(spec: Dict[str, Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare argument types, checked before the call:
    ``@arg_spec({"path": str, "mode": (int, type(None))})``."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, _SPEC, dict(spec))
        return fn
    return deco


class Responder:
    """Sends the one reply to one call; usable from any thread."""

    def __init__(self, router: Router, msg: Message, what: str) -> None:
        self._router = router
        self._msg = msg
        self.what = what
        self._sent = False
        self._lock = threading.Lock()

    def _claim(self) -> bool:
        with self._lock:
            if self._sent:
                return False
            self._sent = True
            return True

    def send(self, value: Any) -> None:
        if not self._claim() or not self._msg.reply_to:
            return
        msg = self._msg
        try:
            reply = Message.encoded(msg.src, self._router.my_id, msg.reply_to, value)
        except Error as exc:
            self._sent = False
            self.fail(exc)
            return
        self._send(reply)

    def fail(self, exc: BaseException, tb: str = "", refused: bool = False) -> None:
        if not self._claim() or not self._msg.reply_to:
            return
        err = CallError.from_exception(exc, tb)
        body = {"type": err.type_name, "message": err.message,
                "traceback": err.remote_traceback, "refused": refused}
        self._send(Message.encoded(self._msg.src, self._router.my_id,
                                   self._msg.reply_to, body, flags=FLAG_ERROR))

    def _send(self, reply: Message) -> None:
        try:
            self._router.send(reply)
        except Error as exc:
            LOG.debug("reply to %s not delivered: %s", self.what, exc)


class CallInfo:
    """What :func:`current_call` returns inside a service method or a
    remotely called function."""

    __slots__ = ("router", "caller", "responder", "deferred")

    def __init__(self, router: Router, caller: Caller, responder: Responder) -> None:
        self.router = router
        self.caller = caller
        self.responder = responder
        self.deferred = False

    @property
    def context(self) -> Context:
        """This context."""
        return self.router.context(self.router.my_id, self.router.name)

    @property
    def parent(self) -> Optional[Context]:
        """The context that started this one (None on the controller)."""
        return self.router.parent

    @property
    def controller(self) -> Context:
        """The root of the tree (the controller, context 0)."""
        return self.router.context(0, "controller")

    @property
    def caller_context(self) -> Context:
        return self.router.context(self.caller.context_id)

    def defer_reply(self) -> Responder:
        """Do not reply when the method returns; the caller keeps waiting
        until ``responder.send(value)`` or ``.fail(exc)``."""
        self.deferred = True
        return self.responder


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("msvc_current_call")


def current_call() -> CallInfo:
    """The call being served by this thread. Raises LookupError outside a
    call."""
    return _CURRENT.get()


class Service:
    """Base class for services. A service is found by :attr:`name`, which
    defaults to ``"<module>.<Class>"``; override it to pick another."""

    name: str = ""

    def __init__(self, router: Router) -> None:
        self.router = router

    @classmethod
    def service_name(cls) -> str:
        return cls.name or "%s.%s" % (cls.__module__, cls.__qualname__)

    def on_shutdown(self) -> None:
        """Called once when the pool stops."""


class DeduplicatingService(Service):
    """Identical concurrent calls (same method, same arguments) run the
    method once; every caller gets the same result or error."""

    def __init__(self, router: Router) -> None:
        super().__init__(router)
        self._dedup_lock = threading.Lock()
        self._inflight: Dict[bytes, List[Responder]] = {}

    def _dedup_call(self, method: str, fn: Callable[..., Any], kwargs: Dict[str, Any],
                    info: CallInfo) -> None:
        key = codec.canonical_key((method, kwargs))
        info.deferred = True
        with self._dedup_lock:
            waiters = self._inflight.get(key)
            if waiters is not None:
                waiters.append(info.responder)
                return
            self._inflight[key] = [info.responder]
        try:
            result: Tuple[bool, Any, str] = (True, fn(**kwargs), "")
        except Exception as exc:
            result = (False, exc, traceback.format_exc())
        with self._dedup_lock:
            waiters = self._inflight.pop(key)
        for r in waiters:
            if result[0]:
                r.send(result[1])
            else:
                r.fail(result[1], result[2])


# (function, skip_self) -> (accepted names, required names, takes **kw).
# Read from the code object once: inspect.signature costs ~17 us per call
# and ~10 ms to import on an agent.
_SIGNATURES: Dict[Tuple[Any, bool], Tuple[frozenset, frozenset, bool]] = {}


def _signature(func: Any, skip_self: bool) -> Tuple[frozenset, frozenset, bool]:
    key = (func, skip_self)
    sig = _SIGNATURES.get(key)
    if sig is None:
        code = getattr(func, "__code__", None)
        if code is None:  # a builtin or callable object: let the call decide
            sig = (frozenset(), frozenset(), True)
        else:
            argc, posonly = code.co_argcount, getattr(code, "co_posonlyargcount", 0)
            pos = code.co_varnames[:argc]
            kwonly = code.co_varnames[argc:argc + code.co_kwonlyargcount]
            n_defaults = len(func.__defaults__ or ())
            required = list(pos[:argc - n_defaults])
            pos = pos[max(posonly, 1 if skip_self else 0):]
            required = required[max(posonly, 1 if skip_self else 0):]
            kwdefaults = func.__kwdefaults__ or {}
            required += [k for k in kwonly if k not in kwdefaults]
            sig = (frozenset(pos + kwonly), frozenset(required),
                   bool(code.co_flags & 0x08))  # CO_VARKEYWORDS
        _SIGNATURES[key] = sig
    return sig


def _check_args(fn: Callable[..., Any], kwargs: Dict[str, Any]) -> Optional[str]:
    func = getattr(fn, "__func__", fn)
    names, required, var_kw = _signature(func, func is not fn)
    for name in kwargs:
        if name not in names and not var_kw:
            return "unexpected argument %r" % name
    for name in sorted(required):
        if name not in kwargs:
            return "missing required argument %r" % name
    spec = getattr(fn, _SPEC, None) or {}
    for name, want in spec.items():
        if name in kwargs and not isinstance(kwargs[name], want):
            types = "/".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            return "argument %r must be %s, got %s" % (name, types, type(kwargs[name]).__name__)
    return None


class Pool:
    """Serves ``services`` on ``router`` with ``size`` threads.

    Args:
        router: the router whose CALL_SERVICE handle to serve.
        services: Service instances or classes (instantiated with router).
        size: worker threads.
        function_modules: module names whose functions parents may call
            through ``Context.call``; None disables function calls.
    """

    def __init__(self, router: Router, services: Iterable[Any] = (), size: int = 4,
                 function_modules: Optional[Callable[[str], bool]] = None) -> None:
        self.router = router
        self._services: Dict[str, Service] = {}
        self._queue: "queue.Queue[Optional[Tuple[Message, Caller, str]]]" = queue.Queue()
        self._function_modules = function_modules
        self._stopped = False
        for svc in services:
            self.add(svc)
        router.add_handler(self._on_service, handle=HANDLE_CALL_SERVICE)
        if function_modules is not None:
            router.add_handler(self._on_function, handle=HANDLE_CALL_FUNCTION)
        self._threads = [threading.Thread(target=self._worker, daemon=True,
                                          name="%s.pool.%d" % (router.name, i))
                         for i in range(size)]
        for t in self._threads:
            t.start()

    def add(self, svc: Any) -> Service:
        if isinstance(svc, type):
            svc = svc(self.router)
        self._services[svc.service_name()] = svc
        return svc

    def get(self, name: str) -> Optional[Service]:
        return self._services.get(name)

    def _on_service(self, msg: Message, caller: Caller) -> None:
        self._queue.put((msg, caller, "service"))

    def _on_function(self, msg: Message, caller: Caller) -> None:
        self._queue.put((msg, caller, "function"))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting calls, let running ones finish (up to ``timeout``
        seconds in total) and call every service's ``on_shutdown``."""
        if self._stopped:
            return
        self._stopped = True
        self.router.del_handler(HANDLE_CALL_SERVICE)
        self.router.del_handler(HANDLE_CALL_FUNCTION)
        for _ in self._threads:
            self._queue.put(None)
        import time
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for svc in self._services.values():
            try:
                svc.on_shutdown()
            except Exception:
                LOG.exception("%s.on_shutdown() failed", svc.service_name())

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            msg, caller, kind = item
            try:
                if kind == "service":
                    self._serve(msg, caller)
                else:
                    self._serve_function(msg, caller)
            except Exception:
                LOG.exception("pool worker failed on %r", msg)

    def _serve(self, msg: Message, caller: Caller) -> None:
        responder = Responder(self.router, msg, "call from %d" % msg.src)
        try:
            service, method, kwargs = msg.data()
            if not (isinstance(service, str) and isinstance(method, str) and isinstance(kwargs, dict)):
                raise ValueError("bad call body")
        except Exception as exc:
            responder.fail(RefusedError.make("?", "?", "malformed call: %s" % exc), refused=True)
            return
        responder.what = "%s.%s()" % (service, method)
        svc = self._services.get(service)
        fn = getattr(svc, method, None) if svc is not None and not method.startswith("_") else None
        policy = getattr(fn, _EXPOSED, None)
        if svc is None:
            reason = "no such service in context %d (%s)" % (self.router.my_id, self.router.name)
        elif fn is None or policy is None:
            reason = "no such exposed method"
        elif not policy.is_authorized(caller):
            reason = "%s refused caller %d via %s (%s)" % (
                policy.describe(), caller.context_id, caller.stream_name, caller.relation)
        else:
            reason = _check_args(fn, kwargs) or ""
        if reason:
            responder.fail(RefusedError.make(service, method, reason), refused=True)
            return
        assert fn is not None
        if isinstance(svc, DeduplicatingService):
            dedup = svc
            self._invoke(responder, caller, lambda info: dedup._dedup_call(method, fn, kwargs, info))
        else:
            self._invoke(responder, caller, lambda info: fn(**kwargs))

    def _invoke(self, responder: Responder, caller: Caller,
                body: Callable[[CallInfo], Any]) -> None:
        """Run ``body`` with current_call() set; reply unless deferred."""
        info = CallInfo(self.router, caller, responder)
        token = _CURRENT.set(info)
        try:
            result = body(info)
        except Exception as exc:
            if not info.deferred:
                responder.fail(exc, traceback.format_exc())
            return
        finally:
            _CURRENT.reset(token)
        if not info.deferred:
            responder.send(result)

    def _serve_function(self, msg: Message, caller: Caller) -> None:
        responder = Responder(self.router, msg, "function call from %d" % msg.src)
        try:
            modname, fname, args, kwargs = msg.data()
            what = "%s.%s()" % (modname, fname)
            responder.what = what
            if not AllowParents().is_authorized(caller):
                raise _Refusal("only parents may call functions")
            if not (isinstance(modname, str) and self._function_modules
                    and self._function_modules(modname)):
                raise _Refusal("module %r was not shipped to this context" % (modname,))
            if not isinstance(fname, str) or fname.startswith("_"):
                raise _Refusal("function name %r is not public" % (fname,))
            # Not sys.modules first: another thread may be importing it
            # right now, and __import__ waits until that import finished.
            mod = __import__(modname, fromlist=["_"])
            fn = getattr(mod, fname, None)
            if not isinstance(fn, type(_check_args)) or fn.__module__ != modname:
                raise _Refusal("%r is not a function defined in %s" % (fname, modname))
        except _Refusal as exc:
            responder.fail(RefusedError("ansible_mitogen_svc.errors.RefusedError",
                                        "refused call: %s" % exc), refused=True)
            return
        except Exception as exc:
            responder.fail(exc, traceback.format_exc())
            return
        self._invoke(responder, caller, lambda info: fn(*args, **kwargs))


class _Refusal(Exception):
    pass
