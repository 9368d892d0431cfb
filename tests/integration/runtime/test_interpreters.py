"""Agents run on every supported target interpreter that is installed
(pyenv's 3.8 to 3.13): locally and as the remote python over ssh."""
from __future__ import annotations

import glob
import os
from typing import Callable, Optional

import pytest

import _remote_helpers as rh
from _remote_helpers import AGENT, Agent
from ansible_mitogen_svc import CallError, call, connect

pytestmark = pytest.mark.timeout(90)

MINORS = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]


def _find(minor: str) -> Optional[str]:
    """The newest pyenv interpreter of ``minor`` installed here, if any."""
    found = sorted(p for p in glob.glob("/root/.pyenv/versions/%s*/bin/python3" % minor)
                   if os.access(p, os.X_OK)
                   and os.path.basename(os.path.dirname(os.path.dirname(p)))
                   .split(".")[:2] == minor.split("."))
    return found[-1] if found else None


@pytest.mark.parametrize("transport", ["local", "ssh"], indirect=True)
@pytest.mark.parametrize("minor", MINORS)
def test_agent_on_interpreter(start_agent: Callable[..., Agent], transport: str,
                              minor: str) -> None:
    python = _find(minor)
    if python is None:
        pytest.skip("no pyenv Python %s installed" % minor)
    agent = start_agent(transport, python=python)
    info = call(agent.context, AGENT, "info")
    assert "%d.%d" % tuple(info["python"][:2]) == minor
    assert os.path.realpath(info["executable"]) == os.path.realpath(python)
    assert agent.context.call(rh.echo, {"b": b"\x00", "t": (1, "two")}) == {"b": b"\x00",
                                                                            "t": (1, "two")}
    with pytest.raises(CallError) as exc:
        agent.context.call(rh.fail_with, "on %s" % minor)
    assert exc.value.type_name == "builtins.ValueError"
    assert "_inner_failure" in exc.value.remote_traceback
    child = connect.fork(agent.context, name="py%s" % minor)
    assert child.call(rh.identity)["ppid"] == info["fork_parent_pid"]
