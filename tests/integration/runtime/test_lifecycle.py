"""Agent lifetime: agents, their fork parents, forked children and chained
agents all exit when the stream to their parent closes; nothing is left
behind after Router.shutdown()."""
from __future__ import annotations

import os
import signal
import time

import pytest

import _remote_helpers as rh
from _remote_helpers import AGENT, Agent, wait_gone
from ansible_mitogen_svc import BrokenError, Context, RoutingError, call, connect

pytestmark = pytest.mark.timeout(60)

#: Seconds processes get to go away after their parent stream closed.
EXIT_BOUND = 5.0


def test_no_orphans_after_router_shutdown(agent: Agent) -> None:
    child = connect.fork(agent.context, name="orphan-check")
    detached = connect.fork(agent.context, name="detached", detach=True)
    pids = agent.all_pids() + [child.pid, detached.pid]  # type: ignore[attr-defined]
    assert len(set(pids)) == len(pids) == 2 * len(agent.chain) + 2
    assert wait_gone(pids, 0) == pids  # all alive now
    t0 = time.monotonic()
    agent.router.shutdown()
    agent.router.join(20.0)
    assert wait_gone(pids, EXIT_BOUND) == []
    assert time.monotonic() - t0 < 2 * EXIT_BOUND


@pytest.mark.parametrize("transport", ["local", "ssh", "chained"], indirect=True)
def test_agent_exits_when_its_parent_stream_closes(agent: Agent, bystander: Context) -> None:
    """Close the stream leading to the agent from its parent's side (the
    controller, or the first agent of a chain)."""
    child = connect.fork(agent.context, name="child")
    pids = [agent.pid, agent.info()["fork_parent_pid"], child.pid]  # type: ignore[attr-defined]
    if len(agent.chain) == 1:
        stream = agent.router.stream_to(agent.context.context_id)
        assert stream is not None
        agent.router.broker.close_stream(stream)
    else:
        # Ask the first agent to close its stream to the chained one.
        agent.chain[0].call(rh.close_stream_to, agent.context.context_id)
    assert wait_gone(pids, EXIT_BOUND) == []
    with pytest.raises((RoutingError, BrokenError)):
        call(agent.context, AGENT, "ping")
    assert call(bystander, AGENT, "ping") is True
    for ctx in agent.chain[:-1]:
        assert call(ctx, AGENT, "ping") is True


@pytest.mark.parametrize("transport", ["local", "chained"], indirect=True)
def test_shutdown_message_ends_the_agent(agent: Agent) -> None:
    pids = [agent.pid, agent.info()["fork_parent_pid"]]
    agent.context.shutdown()
    assert wait_gone(pids, EXIT_BOUND) == []
    for ctx in agent.chain[:-1]:
        assert call(ctx, AGENT, "ping") is True


def test_shutdown_sent_at_once_to_a_new_child_is_obeyed(agent: Agent) -> None:
    """The parent may send a shutdown as soon as fork_child() returned,
    before the child's main thread got to run again: the child must
    already listen for it."""
    pids = []
    for i in range(20):
        child = connect.fork(agent.context, name="quick-%d" % i)
        child.shutdown()
        pids.append(child.pid)  # type: ignore[attr-defined]
    assert wait_gone(pids, EXIT_BOUND) == []
    assert call(agent.context, AGENT, "ping") is True


@pytest.mark.parametrize("transport", ["chained"], indirect=True)
def test_killing_the_first_agent_ends_the_chain(agent: Agent) -> None:
    pids = agent.all_pids()
    first = agent.chain[0]
    pending = agent.context.call_async(rh.sleep, 120)
    os.kill(first.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    t0 = time.monotonic()
    with pytest.raises(BrokenError):
        pending.get(15.0)
    assert time.monotonic() - t0 < 10.0
    assert wait_gone(pids, EXIT_BOUND) == []


def _fd_targets(pid: int) -> set:
    out = set()
    for name in os.listdir("/proc/%d/fd" % pid):
        try:
            out.add(os.readlink("/proc/%d/fd/%s" % (pid, name)))
        except OSError:
            pass
    return out


@pytest.mark.parametrize("transport", ["local", "ssh"], indirect=True)
def test_fork_parent_and_children_hold_no_copy_of_the_agent_stream(agent: Agent) -> None:
    """Otherwise a forked (task) child could write frames as its agent,
    and the agent's death would go unnoticed while a child lives."""
    stream = set(agent.context.call(rh.parent_stream_targets))
    assert stream and all(t.startswith(("socket:", "pipe:")) for t in stream)
    child = connect.fork(agent.context, name="fds")
    fork_parent = agent.info()["fork_parent_pid"]
    assert stream <= _fd_targets(agent.pid)
    assert not stream & _fd_targets(fork_parent)
    assert not stream & _fd_targets(child.pid)  # type: ignore[attr-defined]


@pytest.mark.parametrize("transport", ["local"], indirect=True)
def test_killed_agent_with_live_children_is_noticed_at_once(agent: Agent) -> None:
    child = connect.fork(agent.context, name="busy")
    pending = child.call_async(rh.sleep, 120)
    pids = [agent.pid, agent.info()["fork_parent_pid"], child.pid]  # type: ignore[attr-defined]
    os.kill(agent.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(BrokenError, match="disconnected"):
        pending.get(15.0)
    assert time.monotonic() - t0 < 2.0
    assert wait_gone(pids, EXIT_BOUND) == []
