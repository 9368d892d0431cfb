"""Fixtures of the runtime integration tests: a testbed, routers, agents.

Test-only, controller side.

* ``testbed`` (session): one local sshd host from tests/lib/testbed.py,
  started once; tests that need it are skipped with the reason when sshd
  cannot run here.
* ``router`` (function): a fresh controller Router, shut down (and its
  agents with it) after the test.
* ``controller_pool`` (function): a Pool in the controller serving the
  test services of ``_remote_helpers`` and a JobResultService.
* ``agent`` (function, parametrized by ``transport``): a connected agent
  over ``local``, ``ssh`` (root, /usr/bin/python3), ``chained`` (ssh as
  root, then ``sudo -u msvc-bob``) or ``chained_pw`` (ssh as msvc-alice,
  then ``sudo -p <prompt> -u msvc-bob`` answered with her password). A test
  restricts transports with ``@pytest.mark.parametrize("transport", [...],
  indirect=True)``.
* ``start_agent`` (function): connects further agents, optionally with
  another target interpreter.
* ``bystander`` (function): a second local agent of the same router.
"""
from __future__ import annotations

import pathlib
import shutil
import tempfile
from typing import Any, Callable, Iterator, Optional

import pytest

import _remote_helpers
from _remote_helpers import Agent
from ansible_mitogen_svc import Context, Pool, Router, connect
from ansible_mitogen_svc.jobs import JobResultService

TRANSPORTS = ["local", "ssh", "chained", "chained_pw"]
REMOTE_PYTHON = "/usr/bin/python3"
HELPERS = ["_remote_helpers"]
#: sudo's prompt for the password variant; spawn answers prompts that end
#: in "password:", so a custom one must too.
SUDO_PROMPT = "[msvc-test] sudo password for %p: "
CONNECT_TIMEOUT = 30.0


@pytest.fixture(scope="session")
def testbed(leak_exemptions: Any) -> Iterator[Any]:
    from tests.lib.testbed import Testbed, TestbedError
    ok, reason = Testbed.available()
    if not ok:
        pytest.skip("sshd testbed unavailable: %s" % reason)
    # Not under pytest's basetemp: any pytest run as root (re)sets
    # /tmp/pytest-of-root to 0700, and then sshd, reading authorized_keys
    # as msvc-alice, can no longer reach our workdir.
    workdir = tempfile.mkdtemp(prefix="msvc-runtime-testbed-", dir="/tmp")
    tb = Testbed(pathlib.Path(workdir), count=1)
    try:
        tb.start()
    except (TestbedError, OSError) as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip("sshd testbed cannot run: %s" % exc)
    for host in tb.hosts:  # supervisor and listener live for the session
        for pid in host.process_tree():
            leak_exemptions.add_process(pid)
    try:
        yield tb
    finally:
        tb.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def router() -> Iterator[Router]:
    r = Router(name="controller")
    try:
        yield r
    finally:
        r.shutdown()
        r.join(20.0)


@pytest.fixture
def controller_pool(router: Router) -> Iterator[Pool]:
    pool = Pool(router, [_remote_helpers.Guarded, _remote_helpers.Dedup, JobResultService],
                size=4)
    try:
        yield pool
    finally:
        pool.stop(5.0)


def ssh_agent(router: Router, testbed: Any, user: str = "root", python: str = REMOTE_PYTHON,
              name: Optional[str] = None) -> Context:
    host = testbed.hosts[0]
    return connect.ssh(router, host.address, port=host.port, username=user,
                       ssh_args=host.ssh_options(), python=python, name=name,
                       extra_modules=HELPERS, timeout=CONNECT_TIMEOUT)


def start_transport(request: pytest.FixtureRequest, router: Router, transport: str,
                    python: Optional[str] = None) -> Agent:
    """Connect an agent over ``transport``; ``python`` overrides the
    target interpreter of the (first) agent."""
    if transport == "local":
        return Agent(transport, router, [connect.local(
            router, python=python, extra_modules=HELPERS, timeout=CONNECT_TIMEOUT)])
    tb = request.getfixturevalue("testbed")
    from tests.lib.testbed import ALICE, ALICE_PASSWORD, BOB
    if transport == "ssh":
        return Agent(transport, router, [ssh_agent(router, tb, python=python or REMOTE_PYTHON)])
    if transport == "chained":
        first = ssh_agent(router, tb, python=python or REMOTE_PYTHON)
        second = connect.via(first, ["sudo", "-u", BOB, "--"], python=REMOTE_PYTHON,
                             timeout=CONNECT_TIMEOUT)
        return Agent(transport, router, [first, second])
    if transport == "chained_pw":
        first = ssh_agent(router, tb, user=ALICE, python=python or REMOTE_PYTHON)
        second = connect.via(first, ["sudo", "-p", SUDO_PROMPT, "-u", BOB, "--"],
                             python=REMOTE_PYTHON, password=ALICE_PASSWORD,
                             timeout=CONNECT_TIMEOUT)
        return Agent(transport, router, [first, second])
    raise ValueError("unknown transport %r" % transport)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def agent(request: pytest.FixtureRequest, transport: str, router: Router,
          controller_pool: Pool) -> Agent:
    return start_transport(request, router, transport)


@pytest.fixture
def start_agent(request: pytest.FixtureRequest, router: Router) -> Callable[..., Agent]:
    """``start_agent(transport, python=None)`` connects one more agent of
    the test's router."""
    def start(transport: str, python: Optional[str] = None) -> Agent:
        return start_transport(request, router, transport, python=python)
    return start


@pytest.fixture
def bystander(router: Router) -> Context:
    """A second (local) agent in the same router, to show the controller
    keeps serving others while one agent misbehaves."""
    return connect.local(router, name="bystander", extra_modules=HELPERS,
                         timeout=CONNECT_TIMEOUT)
