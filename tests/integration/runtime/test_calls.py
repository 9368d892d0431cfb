"""Calls and errors over every transport: results, concurrency, and remote
exceptions arriving as CallError with type, message and traceback."""
from __future__ import annotations

import pytest

import _remote_helpers as rh
from ansible_mitogen_svc import CallError, RefusedError, call, connect
from _remote_helpers import AGENT, Agent

pytestmark = pytest.mark.timeout(60)


def test_calls_round_trip(agent: Agent) -> None:
    value = {"text": "h\u00e9llo", "bytes": b"\x00\xff", "n": -(2 ** 70), "f": 1.5,
             "nested": [(1, 2), {"k": None, True: False}], "set": {1, 2}}
    assert agent.context.call(rh.echo, value) == value
    assert agent.context.call(rh.add, 40, b=2) == 42
    assert call(agent.context, AGENT, "ping") is True
    pending = [agent.context.call_async(rh.add, i, i) for i in range(60)]
    assert [p.get(30.0) for p in pending] == [2 * i for i in range(60)]


def test_info_describes_the_agent(agent: Agent) -> None:
    info = agent.info()
    assert info["pid"] == agent.pid
    assert info["id"] == agent.context.context_id
    assert isinstance(info["fork_parent_pid"], int) and info["fork_parent_pid"] != info["pid"]
    if agent.transport.startswith("chained"):
        import pwd
        assert info["uid"] == pwd.getpwnam("msvc-bob").pw_uid
    else:
        assert info["uid"] == 0
    ident = agent.context.call(rh.identity)
    assert ident["pid"] == agent.pid and ident["context_id"] == agent.context.context_id


def test_remote_exception_arrives_as_call_error(agent: Agent) -> None:
    with pytest.raises(CallError) as info:
        agent.context.call(rh.fail_with, "no such widget 7")
    err = info.value
    assert not isinstance(err, RefusedError)
    assert err.type_name == "builtins.ValueError"
    assert err.message == "no such widget 7"
    tb = err.remote_traceback
    assert tb.startswith("Traceback (most recent call last):")
    assert "_remote_helpers.py" in tb and "fail_with" in tb and "_inner_failure" in tb
    assert tb.rstrip().endswith("ValueError: no such widget 7")
    assert "builtins.ValueError: no such widget 7" in str(err)
    # An exception type that exists only in the shipped module.
    with pytest.raises(CallError) as info:
        agent.context.call(rh.fail_custom, "custom failure")
    assert info.value.type_name == "_remote_helpers.HelperError"
    assert info.value.message == "custom failure"
    assert "fail_custom" in info.value.remote_traceback


def test_service_method_error_reaches_a_remote_caller(agent: Agent) -> None:
    """An error raised by a controller service reaches the agent that
    called it as a CallError with the controller-side traceback."""
    out = agent.context.call(rh.call_controller, "tests.Guarded", "explode",
                             {"message": "gone"})
    assert out["ok"] is False and out["class"] == "CallError"
    assert out["type_name"] == "builtins.KeyError"
    assert out["message"] == "'gone'"
    assert "in explode" in out["traceback"]
    out = agent.context.call(rh.call_controller, "tests.Guarded", "anyone", {"value": [1, "x"]})
    assert out == {"ok": True, "value": {"value": [1, "x"], "relation": "child",
                                         "caller": agent.context.context_id}}


@pytest.mark.parametrize("transport", ["local", "chained"], indirect=True)
def test_forked_child_is_served(agent: Agent) -> None:
    child = connect.fork(agent.context, name="calls")
    info = call(child, AGENT, "info")
    assert info["ppid"] == agent.info()["fork_parent_pid"]
    assert child.call(rh.add, 1, 2) == 3
    with pytest.raises(CallError) as exc:
        child.call(rh.fail_with, "from a child")
    assert exc.value.type_name == "builtins.ValueError"
