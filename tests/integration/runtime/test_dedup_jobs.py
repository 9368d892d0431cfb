"""DeduplicatingService under concurrent identical calls from a target, and
forked children pushing job results to the controller."""
from __future__ import annotations

import time

import pytest

import _remote_helpers as rh
from _remote_helpers import Agent
from ansible_mitogen_svc import CallError, Pool, call, connect
from ansible_mitogen_svc.jobs import JobResultService

pytestmark = pytest.mark.timeout(60)

CALLS = 20


def test_dedup_runs_the_body_once_for_identical_concurrent_calls(
        agent: Agent, controller_pool: Pool) -> None:
    svc = controller_pool.get("tests.Dedup")
    svc.expect = CALLS
    results = agent.context.call(rh.call_controller_many, "tests.Dedup", "square",
                                 {"x": 12}, CALLS)
    assert results == [{"ok": True, "value": {"square": 144, "run": 1}}] * CALLS
    assert svc.runs == 1
    # Once finished, the same call runs the body again.
    svc.expect = 1
    assert agent.context.call(rh.call_controller, "tests.Dedup", "square", {"x": 3}) == {
        "ok": True, "value": {"square": 9, "run": 2}}


@pytest.mark.parametrize("transport", ["local", "ssh"], indirect=True)
def test_dedup_shares_one_error_with_every_caller(agent: Agent, controller_pool: Pool) -> None:
    svc = controller_pool.get("tests.Dedup")
    svc.expect = CALLS
    results = agent.context.call(rh.call_controller_many, "tests.Dedup", "fail",
                                 {"message": "shared failure"}, CALLS)
    assert len(results) == CALLS
    for out in results:
        assert out["ok"] is False and out["class"] == "CallError"
        assert out["type_name"] == "_remote_helpers.HelperError"
        assert out["message"] == "shared failure"
        assert "in fail" in out["traceback"]


def test_forked_child_pushes_a_job_result(agent: Agent) -> None:
    ctl = agent.router.context(0)
    info = agent.info()
    job = "job-%s" % agent.transport
    call(ctl, JobResultService.name, "register", job_id=job, owner=agent.context.context_id)
    listener = ctl.call_service_async(JobResultService.name, "listen", job_id=job, timeout=30)
    assert not listener.ready()
    child = connect.fork(agent.context, name="job")
    pushed = child.call(rh.push_job, job)
    result = listener.get(30.0)
    assert result == pushed
    assert result["pid"] == child.pid != info["pid"]
    # The child's process parent is the virgin fork parent, not the agent.
    assert result["ppid"] == info["fork_parent_pid"]
    assert result["ppid"] != info["pid"]
    assert call(ctl, JobResultService.name, "get", job_id=job) == {
        "state": "finished", "result": pushed}


@pytest.mark.parametrize("transport", ["local"], indirect=True)
def test_job_result_from_another_subtree_is_refused(agent: Agent, bystander: object) -> None:
    """A child of one agent cannot push the result of a job registered for
    another agent."""
    ctl = agent.router.context(0)
    call(ctl, JobResultService.name, "register", job_id="theirs", owner=agent.context.context_id)
    intruder = connect.fork(bystander, name="intruder")  # type: ignore[arg-type]
    with pytest.raises(CallError) as exc:
        intruder.call(rh.push_job, "theirs")
    assert exc.value.type_name == "builtins.PermissionError"
    assert "may not push a result for job 'theirs'" in exc.value.message
    assert call(ctl, JobResultService.name, "get", job_id="theirs")["state"] == "running"


@pytest.mark.parametrize("transport", ["local"], indirect=True)
def test_get_settles_on_a_job_that_just_started(agent: Agent) -> None:
    """get(settle=S) on a job registered less than S seconds ago answers
    when it is pushed, or with "running" once S seconds have passed since
    the registration; never for an unknown or older job."""
    ctl = agent.router.context(0)
    svc = JobResultService.name
    call(ctl, svc, "register", job_id="quick", owner=agent.context.context_id)
    pending = ctl.call_service_async(svc, "get", job_id="quick", settle=30)
    time.sleep(0.2)
    assert not pending.ready()
    pushed = connect.fork(agent.context, name="quick").call(rh.push_job, "quick")
    assert pending.get(10.0) == {"state": "finished", "result": pushed}

    call(ctl, svc, "register", job_id="slow", owner=agent.context.context_id)
    t0 = time.monotonic()
    assert call(ctl, svc, "get", job_id="slow", settle=0.5) == {"state": "running",
                                                                  "result": None}
    assert time.monotonic() - t0 >= 0.4
    t0 = time.monotonic()
    assert call(ctl, svc, "get", job_id="slow", settle=0.5)["state"] == "running"
    assert call(ctl, svc, "get", job_id="never registered", settle=30)["state"] == "unknown"
    assert call(ctl, svc, "get", job_id="slow")["state"] == "running"
    assert time.monotonic() - t0 < 0.4
    assert call(ctl, svc, "statistics")["listeners"] == 0
