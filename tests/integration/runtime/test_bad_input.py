"""Bad input from a target, over every transport: a truncated frame, an
oversized frame, garbage bytes, and an agent killed in the middle of a long
call. Each must end the pending call with a clear error within a bounded
time, and the controller must keep serving another agent of the router."""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import pytest

import _remote_helpers as rh
from _remote_helpers import AGENT, JOBS, Agent, wait_gone
from ansible_mitogen_svc import BrokenError, Context, RoutingError, call
from ansible_mitogen_svc.wire import HANDLE_CALL_SERVICE, HEADER, MAGIC, WIRE_VERSION, Message

pytestmark = pytest.mark.timeout(60)

#: The pending call must fail within this many seconds of the misdeed.
BOUND = 10.0


def _header(length: int, version: int = WIRE_VERSION, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, version, flags, 0, 0, 0, 1, 0, length)


#: kind -> (bytes the target writes, whether it exits right after, text the error must hold)
BAD_INPUT = {
    "truncated": (_header(100) + b"x" * 10, True,
                  "stream ended inside a frame body (10 of 100 bytes)"),
    "oversized": (_header(2 ** 32 - 1) + b"y" * 64, False,
                  "frame body of 4294967295 bytes exceeds the limit of 67108864 bytes"),
    "garbage": (b"GET / HTTP/1.0\r\n" * 8, False, "bad magic 0x4745 (garbage on the stream?)"),
}


def _check_fails_fast(agent: Agent, bystander: Context, start: Callable[[], Any],
                      expect: str) -> None:
    victim = agent.context
    pids = [agent.pid, agent.info()["fork_parent_pid"]]
    assert call(bystander, AGENT, "ping") is True
    t0 = time.monotonic()
    pending = start()
    with pytest.raises(BrokenError) as exc:
        pending.get(BOUND + 5)
    elapsed = time.monotonic() - t0
    assert elapsed < BOUND, "took %.1fs" % elapsed
    message = str(exc.value)
    assert expect in message, message
    assert "disconnected" in message and victim.name in message, message
    # The controller keeps serving the other agent...
    assert call(bystander, AGENT, "ping") is True
    assert bystander.call(rh.add, 2, 3) == 5
    # ...and says at once that the broken one is gone.
    t0 = time.monotonic()
    with pytest.raises((RoutingError, BrokenError)):
        call(victim, AGENT, "ping")
    assert time.monotonic() - t0 < BOUND
    # The victim (and its fork parent) went away: no orphans.
    assert wait_gone(pids) == []
    # The rest of the chain, if any, still works.
    for ctx in agent.chain[:-1]:
        assert call(ctx, AGENT, "ping") is True


@pytest.mark.parametrize("kind", sorted(BAD_INPUT))
def test_bad_frame_from_target(agent: Agent, bystander: Context, kind: str) -> None:
    data, exit_after, expect = BAD_INPUT[kind]
    _check_fails_fast(agent, bystander,
                      lambda: agent.context.call_async(rh.write_raw, data, exit_after), expect)


def test_agent_killed_during_a_long_call(agent: Agent, bystander: Context) -> None:
    def start() -> Any:
        pending = agent.context.call_async(rh.sleep, 120)
        time.sleep(0.3)
        assert not pending.ready()
        os.kill(agent.pid, signal.SIGKILL)
        return pending
    _check_fails_fast(agent, bystander, start, "disconnected")


def test_bad_calls_from_target(agent: Agent, bystander: Context) -> None:
    """Unknown service, unknown method and wrong argument types sent by a
    target are refused with a clear error at once; the target's stream and
    everyone else carry on."""
    cases = [
        ("tests.Missing", "anything", {}, "no such service in context 0 (controller)"),
        ("tests.Guarded", "missing", {}, "no such exposed method"),
        ("tests.Guarded", "typed", {"count": [1], "label": "x"},
         "argument 'count' must be int, got list"),
        (JOBS, "push", {"job_id": 7, "result": None}, "argument 'job_id' must be str, got int"),
    ]
    for service, method, kwargs, reason in cases:
        t0 = time.monotonic()
        out = agent.context.call(rh.call_controller, service, method, kwargs)
        assert time.monotonic() - t0 < BOUND
        assert out["ok"] is False and out["class"] == "RefusedError", out
        assert out["message"] == "refused call to %s.%s(): %s" % (service, method, reason)
    assert call(agent.context, AGENT, "ping") is True
    assert call(bystander, AGENT, "ping") is True


@pytest.mark.parametrize("transport", ["local", "chained"], indirect=True)
def test_forged_source_closes_the_stream(agent: Agent, bystander: Context) -> None:
    """A well-formed frame claiming to come from the controller is refused
    by the ingress check of the stream's receiving end."""
    forged = Message.encoded(0, 0, HANDLE_CALL_SERVICE, ("tests.Guarded", "anyone", {}),
                             auth=0).pack()
    lo = agent.context.context_id
    _check_fails_fast(agent, bystander,
                      lambda: agent.context.call_async(rh.write_raw, forged),
                      "child stream owning ids [%d, " % lo)


def test_target_cannot_reach_a_sibling(agent: Agent, bystander: Context) -> None:
    out = agent.context.call(rh.call_context, bystander.context_id, AGENT, "ping", {})
    assert out["ok"] is False and out["class"] == "RoutingError", out
    assert "route from a sibling to context %d refused" % bystander.context_id in out["str"]
    assert call(bystander, AGENT, "ping") is True
    assert call(agent.context, AGENT, "ping") is True


@pytest.mark.parametrize("transport", ["local"], indirect=True)
@pytest.mark.parametrize("version,flags,expect", [
    (WIRE_VERSION + 1, 0, "wire version %d, expected %d" % (WIRE_VERSION + 1, WIRE_VERSION)),
    (WIRE_VERSION, 0x80, "unknown flags 0x80"),
])
def test_bad_header_fields_from_target(agent: Agent, bystander: Context, version: int,
                                       flags: int, expect: str) -> None:
    data = _header(0, version=version, flags=flags)
    _check_fails_fast(agent, bystander, lambda: agent.context.call_async(rh.write_raw, data),
                      expect)
