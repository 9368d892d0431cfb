"""Who may call what, over every transport: policies, unexposed and unknown
methods, and argument checks. Every refusal names the service, the method
and the reason."""
from __future__ import annotations

import os
from typing import Any, Dict

import pytest

import _remote_helpers as rh
from _remote_helpers import AGENT, Agent
from ansible_mitogen_svc import RefusedError, call

pytestmark = pytest.mark.timeout(60)

REFUSED = "ansible_mitogen_svc.errors.RefusedError"


def _from_agent(agent: Agent, method: str, **kwargs: Any) -> Dict[str, Any]:
    """The agent calls tests.Guarded.<method> in the controller."""
    return agent.context.call(rh.call_controller, "tests.Guarded", method, kwargs)


def _assert_refused(out: Dict[str, Any], service: str, method: str, reason: str) -> None:
    assert out["ok"] is False, out
    assert out["class"] == "RefusedError", out
    assert out["type_name"] == REFUSED
    assert out["message"].startswith("refused call to %s.%s(): " % (service, method)), out
    assert reason in out["message"], out


# -- an agent calling services in the controller -----------------------------------
def test_policies_for_a_target_calling_the_controller(agent: Agent) -> None:
    # AllowParents: the agent is a child of the controller, so no.
    out = _from_agent(agent, "parents_only")
    _assert_refused(out, "tests.Guarded", "parents_only", "AllowParents refused caller %d"
                    % agent.context.context_id)
    assert "(child)" in out["message"]
    # AllowAny: yes, and the service sees who called.
    assert _from_agent(agent, "anyone", value="v") == {
        "ok": True, "value": {"value": "v", "relation": "child",
                              "caller": agent.context.context_id}}
    # Methods without @expose, private ones and base-class ones: unreachable.
    for method in ("hidden", "__init__", "_waiting", "on_shutdown"):
        _assert_refused(_from_agent(agent, method), "tests.Guarded", method,
                        "no such exposed method")
    # Unknown service and unknown method.
    out = agent.context.call(rh.call_controller, "tests.NoSuchService", "anything", {})
    _assert_refused(out, "tests.NoSuchService", "anything", "no such service in context 0")
    _assert_refused(_from_agent(agent, "no_such_method"), "tests.Guarded", "no_such_method",
                    "no such exposed method")


def test_allow_parents_admits_the_controller_itself(router: Any, controller_pool: Any) -> None:
    assert call(router.context(0), "tests.Guarded", "parents_only") == "parents-only ok"


def test_wrong_argument_types_from_target(agent: Agent) -> None:
    _assert_refused(_from_agent(agent, "typed", count="3", label="x"), "tests.Guarded",
                    "typed", "argument 'count' must be int, got str")
    _assert_refused(_from_agent(agent, "typed", count=3, label=None), "tests.Guarded",
                    "typed", "argument 'label' must be str, got NoneType")
    _assert_refused(_from_agent(agent, "typed", count=3), "tests.Guarded", "typed",
                    "missing required argument 'label'")
    _assert_refused(_from_agent(agent, "typed", count=3, label="x", extra=1), "tests.Guarded",
                    "typed", "unexpected argument 'extra'")
    assert _from_agent(agent, "typed", count=3, label="x") == {"ok": True, "value": "x=3"}


# -- the controller calling services in an agent ------------------------------------
def _refused(ctx: Any, service: str, method: str, reason: str, **kwargs: Any) -> None:
    with pytest.raises(RefusedError) as info:
        call(ctx, service, method, **kwargs)
    err = info.value
    assert err.type_name == REFUSED
    assert err.message.startswith("refused call to %s.%s(): " % (service, method)), err.message
    assert reason in err.message, err.message


def test_controller_refusals_in_agent(agent: Agent) -> None:
    ctx = agent.context
    _refused(ctx, "no.Such", "ping", "no such service in context %d" % ctx.context_id)
    _refused(ctx, AGENT, "no_such", "no such exposed method")
    _refused(ctx, AGENT, "on_shutdown", "no such exposed method")
    _refused(ctx, AGENT, "_extra", "no such exposed method")
    _refused(ctx, AGENT, "fork_child", "argument 'name' must be str, got int", name=5)
    _refused(ctx, AGENT, "fork_child", "argument 'detach' must be bool, got str",
             detach="yes")
    _refused(ctx, AGENT, "start_hop", "missing required argument 'hop'", name="x")
    _refused(ctx, AGENT, "start_hop", "argument 'hop' must be dict, got list", hop=[],
             name="x")
    _refused(ctx, AGENT, "ping", "unexpected argument 'x'", x=1)
    assert call(ctx, AGENT, "ping") is True


@pytest.mark.parametrize("transport", ["local", "ssh"], indirect=True)
def test_function_calls_are_limited_to_shipped_public_functions(agent: Agent) -> None:
    ctx = agent.context
    with pytest.raises(RefusedError) as info:
        ctx.call(os.getpid)
    assert "was not shipped" in info.value.message
    with pytest.raises(RefusedError) as info:
        ctx.send_call(2, ("_remote_helpers", "_private", (), {}), "private").get(30.0)
    assert "is not public" in info.value.message
    with pytest.raises(RefusedError) as info:
        ctx.send_call(2, ("_remote_helpers", "JOBS", (), {}), "constant").get(30.0)
    assert "not a function defined in _remote_helpers" in info.value.message


@pytest.mark.parametrize("transport", ["local", "chained"], indirect=True)
def test_forked_child_may_not_use_parent_only_methods_of_its_agent(agent: Agent) -> None:
    """A forked child's call up into its agent arrives there as CHILD:
    AllowParents (info) refuses it, AllowAny (ping) admits it."""
    from ansible_mitogen_svc import connect
    child = connect.fork(agent.context, name="policy")
    parent_id = agent.context.context_id
    out = child.call(rh.call_context, parent_id, AGENT, "info", {})
    _assert_refused(out, AGENT, "info", "AllowParents refused caller %d" % child.context_id)
    assert child.call(rh.call_context, parent_id, AGENT, "ping", {}) == {"ok": True,
                                                                         "value": True}
