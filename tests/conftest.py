"""Suite-wide test configuration: import paths, strictness and leak checks.

Test-only, controller side.

* The repository root (for ``ansible_mitogen_svc`` and ``tests.lib``) and
  ``tests/integration/runtime`` (for ``_remote_helpers``, a module shipped
  to agents under its top-level name) are put on ``sys.path``.
* Warnings are errors, and every test gets a timeout: its own
  ``@pytest.mark.timeout``, else the run-wide one (pytest.ini, --timeout),
  else ``DEFAULT_TIMEOUT``.
* The autouse :func:`no_leaks` fixture fails any test that leaves behind
  threads, file descriptors or child processes once a short grace period
  has passed. Mark a test ``@pytest.mark.leaks_ok`` to opt out.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_TESTS = os.path.join(ROOT, "tests", "integration", "runtime")
for _path in (RUNTIME_TESTS, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

#: Seconds a test may run when it does not say otherwise.
DEFAULT_TIMEOUT = 60
#: Seconds a test's leftovers get to go away before they count as leaks.
LEAK_GRACE = 5.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", "error")
    config.addinivalue_line(
        "markers", "leaks_ok: skip the thread/fd/child process leak check for this test")


def _configured_timeout(config: pytest.Config) -> float:
    """The run-wide pytest-timeout setting (command line or ini), 0 if none."""
    for source in ("option", "ini"):
        try:
            value = (config.getoption("timeout", None) if source == "option"
                     else config.getini("timeout"))
        except (ValueError, KeyError):
            continue
        try:
            if value not in (None, "") and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            pass
    return 0.0


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if _configured_timeout(config):
        return  # pytest.ini or --timeout already bounds every test
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


# -- process, fd and thread snapshots ----------------------------------------------
def _proc_stat(pid: int) -> Tuple[int, str, int]:
    """(ppid, state, starttime) of ``pid``; raises OSError when it is gone."""
    with open("/proc/%d/stat" % pid, "rb") as fp:
        raw = fp.read().decode("ascii", "replace")
    fields = raw[raw.rindex(")") + 2:].split()  # the command may hold ") "
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root: int) -> Dict[Tuple[int, int], str]:
    """Every process whose parent chain includes ``root``, zombies too:
    ``{(pid, starttime): state}``. (pid, starttime) survives pid reuse."""
    children: Dict[int, List[Tuple[int, int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid, state, start = _proc_stat(int(entry))
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append((int(entry), start, state))
    found: Dict[Tuple[int, int], str] = {}
    todo = [root]
    while todo:
        for pid, start, state in children.get(todo.pop(), ()):
            if (pid, start) not in found:
                found[(pid, start)] = state
                todo.append(pid)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fp:
            return fp.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()[:160]
    except OSError:
        return "?"


def open_fds() -> Dict[int, str]:
    """fd -> what it points at, for this process."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass  # the fd listdir itself used, now closed
    return out


class LeakExemptions:
    """Long-lived processes a session fixture started on purpose (an sshd
    testbed): the leak check ignores exactly these, not their children."""

    def __init__(self) -> None:
        self.procs: Set[Tuple[int, int]] = set()

    def add_process(self, pid: int) -> None:
        try:
            self.procs.add((pid, _proc_stat(pid)[2]))
        except (OSError, ValueError, IndexError):
            pass


class Snapshot:
    """Threads, fds and descendant processes of this process, right now."""

    def __init__(self) -> None:
        self.threads: Set[threading.Thread] = {t for t in threading.enumerate() if t.is_alive()}
        self.fds = open_fds()
        self.procs = descendants(os.getpid())

    def leaks_since(self, before: "Snapshot", exempt: Set[Tuple[int, int]] = frozenset()
                    ) -> List[str]:
        problems = []
        new_threads = self.threads - before.threads
        if new_threads:
            problems.append("threads still running: %s" % sorted(t.name for t in new_threads))
        if len(self.fds) > len(before.fds):
            extra = {fd: target for fd, target in self.fds.items()
                     if before.fds.get(fd) != target}
            problems.append("%d fds open, %d before; new or changed: %s"
                            % (len(self.fds), len(before.fds), extra))
        new_procs = set(self.procs) - set(before.procs) - set(exempt)
        if new_procs:
            problems.append("child processes left: %s" % [
                "%d (%s) %s" % (pid, self.procs[(pid, s)], _cmdline(pid))
                for pid, s in sorted(new_procs)])
        return problems


def wait_for_no_leaks(before: Snapshot, exempt: Set[Tuple[int, int]] = frozenset(),
                      grace: float = LEAK_GRACE) -> List[str]:
    """Poll for up to ``grace`` seconds; the problems still left, if any."""
    deadline = time.monotonic() + grace
    while True:
        problems = Snapshot().leaks_since(before, exempt)
        if not problems or time.monotonic() >= deadline:
            return problems
        time.sleep(0.05)


@pytest.fixture(scope="session")
def leak_exemptions() -> LeakExemptions:
    """Register processes a session fixture keeps running on purpose."""
    return LeakExemptions()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest, leak_exemptions: LeakExemptions) -> Iterator[None]:
    """Fail the test if it leaks threads, fds or child processes.

    Being autouse and function-scoped, this is set up before, and torn
    down after, every other function-scoped fixture of the test, so what
    those fixtures start and stop is inside the window too."""
    if request.node.get_closest_marker("leaks_ok") is not None:
        yield
        return
    before = Snapshot()
    yield
    problems = wait_for_no_leaks(before, leak_exemptions.procs)
    if problems:
        pytest.fail("%s leaked after %.0fs of grace:\n  %s"
                    % (request.node.nodeid, LEAK_GRACE, "\n  ".join(problems)), pytrace=False)
