"""Functions the runtime tests call inside agents, services they host in
the controller, and small controller-side helpers (``Agent``,
``wait_gone``) shared by the test modules.

Test-only. Shipped to agents (``extra_modules=["_remote_helpers"]``) under
this top-level name, so it must import nothing but the standard library
and ``ansible_mitogen_svc``; the controller imports the same file from
``tests/integration/runtime`` (put on ``sys.path`` by tests/conftest.py).
"""
from __future__ import annotations

import os
import select
import signal
import threading
import time
from typing import Any, Dict, List, Optional

from ansible_mitogen_svc import (AllowAny, AllowParents, CallError, Context,
                                 DeduplicatingService, Router, Service, arg_spec, call,
                                 current_call, expose)

JOBS = "ansible_mitogen_svc.jobs.JobResultService"
AGENT = "ansible_mitogen_svc.agent.AgentService"


class HelperError(Exception):
    """An exception type that exists only in this module."""


# -- plain functions, run in an agent with Context.call --------------------------------
def echo(value: Any) -> Any:
    return value


def add(a: int, b: int) -> int:
    return a + b


def identity() -> Dict[str, Any]:
    return {"pid": os.getpid(), "ppid": os.getppid(), "uid": os.getuid(),
            "context_id": current_call().router.my_id}


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _inner_failure(message: str) -> None:
    raise ValueError(message)


def fail_with(message: str) -> None:
    """Raises ValueError(message) one frame down, for traceback checks."""
    _inner_failure(message)


def fail_custom(message: str) -> None:
    raise HelperError(message)


def _private() -> str:
    return "must never be callable remotely"


def _describe(exc: BaseException) -> Dict[str, Any]:
    out: Dict[str, Any] = {"ok": False, "class": type(exc).__name__, "str": str(exc)}
    if isinstance(exc, CallError):
        out.update(type_name=exc.type_name, message=exc.message,
                   traceback=exc.remote_traceback)
    return out


def call_context(context_id: int, service: str, method: str,
                 kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Call ``service.method(**kwargs)`` in context ``context_id`` and
    describe the outcome, so an error raised *here* reaches the test."""
    try:
        value = call(current_call().router.context(context_id), service, method, **kwargs)
    except Exception as exc:
        return _describe(exc)
    return {"ok": True, "value": value}


def call_controller(service: str, method: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`call_context` for the controller (context 0)."""
    return call_context(0, service, method, kwargs)


def call_controller_many(service: str, method: str, kwargs: Dict[str, Any],
                         count: int) -> List[Dict[str, Any]]:
    """Start ``count`` identical calls to the controller at once, then
    collect every outcome."""
    ctl = current_call().controller
    pending = [ctl.call_service_async(service, method, **kwargs) for _ in range(count)]
    out = []
    for p in pending:
        try:
            out.append({"ok": True, "value": p.get(30.0)})
        except Exception as exc:
            out.append(_describe(exc))
    return out


def push_job(job_id: str) -> Dict[str, Any]:
    """Push this process's identity as the result of ``job_id`` to the
    controller's JobResultService; returns what was pushed."""
    result = {"pid": os.getpid(), "ppid": os.getppid(), "job": job_id}
    call(current_call().controller, JOBS, "push", job_id=job_id, result=result)
    return result


def parent_stream_fd() -> int:
    """The fd this context writes its parent stream to."""
    router = current_call().router
    stream = router.stream_to(router.parent.context_id if router.parent else 0)
    assert stream is not None, "no parent stream"
    return stream.transport.wfd


def parent_stream_targets() -> List[str]:
    """What this context's parent stream fds point at (``socket:[n]``,
    ``pipe:[n]``), to look for copies of them in other processes."""
    router = current_call().router
    stream = router.stream_to(router.parent.context_id if router.parent else 0)
    assert stream is not None, "no parent stream"
    fds = {stream.transport.rfd, stream.transport.wfd}
    return sorted({os.readlink("/proc/self/fd/%d" % fd) for fd in fds})


def close_stream_to(context_id: int) -> bool:
    """Close this context's stream towards ``context_id`` (a child)."""
    router = current_call().router
    stream = router.stream_to(context_id)
    if stream is None or stream is router.stream_to(router.parent.context_id):
        return False
    router.broker.close_stream(stream)
    return True


def write_raw(data: bytes, exit_after: bool = False) -> str:
    """Write ``data`` unframed to the parent stream, then, with
    ``exit_after``, end this process at once (so the peer also sees EOF
    right after the bytes)."""
    router = current_call().router
    stream = router.stream_to(router.parent.context_id if router.parent else 0)
    assert stream is not None, "no parent stream"
    fd = stream.transport.wfd
    with stream._lock:  # no frame of ours may interleave with these bytes
        view = memoryview(data)
        while view:
            select.select([], [fd], [], 5.0)
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                continue
            view = view[n:]
    if exit_after:
        os._exit(3)
    return "written"


# -- services hosted in the controller ---------------------------------------------
class Guarded(Service):
    """Policies and argument checks, as seen by callers anywhere."""

    name = "tests.Guarded"

    @expose(AllowParents())
    def parents_only(self) -> str:
        return "parents-only ok"

    @expose(AllowAny())
    def anyone(self, value: Any = None) -> Dict[str, Any]:
        caller = current_call().caller
        return {"value": value, "relation": caller.relation, "caller": caller.context_id}

    def hidden(self) -> str:  # deliberately not exposed
        return "hidden"

    @expose(AllowAny())
    @arg_spec({"count": int, "label": str})
    def typed(self, count: int, label: str) -> str:
        return "%s=%d" % (label, count)

    @expose(AllowAny())
    def explode(self, message: str) -> None:
        raise KeyError(message)


class Dedup(DeduplicatingService):
    """Counts how often its body really runs. The body holds on until
    ``expect`` identical calls are waiting (or 10 s pass), so the test does
    not depend on how fast calls arrive."""

    name = "tests.Dedup"

    def __init__(self, router: Any) -> None:
        super().__init__(router)
        self.runs = 0
        self.expect = 1
        self._runs_lock = threading.Lock()

    def _waiting(self) -> int:
        with self._dedup_lock:
            return sum(len(v) for v in self._inflight.values())

    @expose(AllowAny())
    @arg_spec({"x": int})
    def square(self, x: int) -> Dict[str, int]:
        with self._runs_lock:
            self.runs += 1
            run = self.runs
        deadline = time.monotonic() + 10.0
        while self._waiting() < self.expect and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"square": x * x, "run": run}

    @expose(AllowAny())
    def fail(self, message: str) -> None:
        deadline = time.monotonic() + 10.0
        while self._waiting() < self.expect and time.monotonic() < deadline:
            time.sleep(0.01)
        raise HelperError(message)


# -- controller-side support for the tests (unused in agents) --------------------------
class Agent:
    """A connected agent under test.

    Attributes:
        transport: how it was reached.
        router: the controller's router.
        context: the agent the test talks to (the chained one for chained
            transports).
        chain: every agent context from the controller down to
            ``context`` (one entry unless chained).
        pid: ``context``'s process id (every testbed host is this machine).
    """

    def __init__(self, transport: str, router: Router, chain: List[Context]) -> None:
        self.transport = transport
        self.router = router
        self.chain = chain
        self.context = chain[-1]
        self.pid: int = self.context.pid  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return "Agent(%s, %r, pid=%d)" % (self.transport, self.context, self.pid)

    def info(self, context: Optional[Context] = None) -> Dict[str, Any]:
        return call(context or self.context, AGENT, "info")

    def all_pids(self) -> List[int]:
        """Pids of every agent of the chain and of their fork parents."""
        pids = []
        for ctx in self.chain:
            info = self.info(ctx)
            pids.append(info["pid"])
            if info["fork_parent_pid"]:
                pids.append(info["fork_parent_pid"])
        return pids


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (gone or a zombie)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as fp:
            raw = fp.read()
    except OSError:
        return True
    return raw[raw.rindex(b")") + 2:][:1] in (b"Z", b"X")


def wait_gone(pids: List[int], timeout: float = 8.0) -> List[int]:
    """Wait up to ``timeout`` seconds; the pids still running then."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if not pid_gone(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def kill_quietly(pids: List[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
