"""Async tasks, mitogen_async_status and task isolation (issue 4) on real
sshd targets: every playbook runs under vanilla ``linear`` and under
``mitogen.svc.mitogen_linear`` and the captured results must be equal
after :mod:`_compare` normalised them and :func:`scrub` removed what
differs between any two runs of an async task:

* job ids (random) wherever they appear, e.g. in ``results_file`` (masked
  by :mod:`_compare`, as in every comparison);
* ``attempts`` of ``until`` loops: how many polls a job needed depends on
  how fast the poller is, and mitogen's polls come back sooner (but see
  "short job, first status");
* ``child_pid`` of a timeout record;
* the ``msg`` of a record for output that is not JSON: the traceback of
  the code that found no JSON (async_wrapper's, or the job supervisor's);
  :func:`scrub` keeps only that it is such a traceback.

Test-only, controller side. Playbooks: playbooks/async_*.yml, with the
test module playbooks/library/msvc_async_probe.py and the test action
playbooks/action_plugins/msvc_mux_counters.py.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compare import JOB_ID, compact_diff, normalise_all  # noqa: E402
from conftest import AnsibleEnv, Run, ansible_version, run_playbook  # noqa: E402

# Also on the older ansible-core lines in CI (scripts/test.sh): job records
# and async_status answers differ between them.
pytestmark = [pytest.mark.timeout(900), pytest.mark.smoke]

LINEAR = "linear"
MITOGEN = "mitogen.svc.mitogen_linear"
RUN_TIMEOUT = 400.0
#: Result keys that differ between two runs of the same async task.
VOLATILE = frozenset({"attempts", "child_pid"})


NO_JSON = "ValueError: No start of json char found"


def scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<traceback: %s>" % NO_JSON if k == "msg" and isinstance(v, str)
                    and v.startswith("Traceback (most recent call last):")
                    and v.rstrip().endswith(NO_JSON) else scrub(v))
                for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def comparable(run: Run, skip: Iterable[str] = ()) -> List[Dict[str, Any]]:
    skipped = set(skip)
    return [scrub(e) for e in normalise_all(run.results) if e["task"] not in skipped]


#: Job ids seen in this module's runs: their files are removed at the end.
_JOBS_SEEN: Set[str] = set()
#: Where the playbooks' jobs write (root's and msvc-bob's default async dir).
ASYNC_DIRS = [Path("/root/.ansible_async"), Path("/home/msvc-bob/.ansible_async")]


@pytest.fixture(scope="module", autouse=True)
def remove_job_files() -> Iterator[None]:
    """Vanilla leaves the files of jobs nobody cleaned up; so do the
    playbooks (like users do). Remove those of this module's runs."""
    yield
    for jid in _JOBS_SEEN:
        for directory in ASYNC_DIRS:
            for path in (directory / jid, directory / (jid + ".tmp")):
                try:
                    path.unlink()
                except OSError:
                    pass


def play(env: AnsibleEnv, playbook: str, strategy: str, tag: str,
         extra_vars: Optional[Dict[str, str]] = None, rc: Optional[int] = 0) -> Run:
    """Run ``playbook``; its exit status must be ``rc`` (None: any).

    One ssh retry (``ANSIBLE_SSH_RETRIES``, honoured by both plugins): the
    polls here leave vanilla's 2 s ControlPersist master idle long enough to
    exit, and a command that attaches to it as it exits fails with status
    255 and no message (seen once on a busy machine). No test here is about
    failed logins."""
    # Markers a run cut short left behind would make the next run's "clean
    # markers" task report a change (the targets are this machine).
    for stale in glob.glob("/tmp/msvc-async-it-*"):
        if os.path.isdir(stale):
            shutil.rmtree(stale)
        else:
            os.unlink(stale)
    run = run_playbook(env, playbook, strategy, tag, extra_vars=extra_vars, timeout=RUN_TIMEOUT,
                       extra_env={"ANSIBLE_SSH_RETRIES": "1"})
    _JOBS_SEEN.update(JOB_ID.findall(json.dumps(run.results)))
    assert rc is None or run.rc == rc, "%s under %s: rc=%s\nstdout:\n%s\nstderr:\n%s" % (
        playbook, strategy, run.rc, run.proc.stdout[-6000:], run.proc.stderr[-4000:])
    return run


def assert_same(vanilla: List[Dict[str, Any]], ours: List[Dict[str, Any]]) -> None:
    assert len(vanilla) == len(ours), "%d vs %d results: %s" % (
        len(vanilla), len(ours), compact_diff([e["task"] for e in vanilla],
                                              [e["task"] for e in ours]))
    for a, b in zip(vanilla, ours):
        assert a == b, "%s on %s differs:\n%s" % (a["task"], a["host"], compact_diff(a, b))


def results_of(run: Run, task: str) -> Dict[str, Dict[str, Any]]:
    """host -> result of ``task``."""
    return {e["host"]: e["result"] for e in run.results if e["task"] == task}


def test_async_basics_match_vanilla(ansible_env: AnsibleEnv, testbed: Any) -> None:
    """poll 1; poll 0 then async_status until finished, cleanup and the
    status after it; two jobs at once; loops; a custom async dir; junk
    around the JSON; failing and raising modules; stderr kept; check mode;
    become."""
    vanilla = play(ansible_env, "async_basic.yml", LINEAR, "basic_linear")
    ours = play(ansible_env, "async_basic.yml", MITOGEN, "basic_mitogen")
    assert vanilla.stats == ours.stats
    assert_same(comparable(vanilla), comparable(ours))
    hosts = [h.name for h in testbed.hosts]
    for host in hosts:
        both = results_of(ours, "two jobs, wait")[host]["results"]
        assert [r["stdout"] for r in both] == ["overlapped", "overlapped"]
        assert results_of(ours, "become, poll 1")[host]["stdout"] == "msvc-bob"
        assert results_of(ours, "poll 0 status after cleanup")[host]["msg"] == \
            "could not find job"
        assert results_of(ours, "custom async dir, the job file")[host]["msg"] == \
            "True 0644 root"
        assert results_of(ours, "junk around the JSON")[host]["warnings"] == [
            "Module invocation had junk after the JSON data: junk after the JSON"]
        assert results_of(ours, "stderr kept")[host]["stderr"] == "raw stderr of the probe\n"
        # Ours waits for the push (2 s window); vanilla's 1 attempt is
        # its own timing (usual, not guaranteed on a loaded machine).
        quick = results_of(ours, "short job, first status")[host]
        theirs = results_of(vanilla, "short job, first status")[host]
        assert (quick["stdout"], quick["attempts"]) == ("quick", 1), \
            "vanilla needed %s attempt(s)" % theirs["attempts"]
    # The poll task and async_status tasks keep their action name.
    assert {e["action"] for e in ours.results if e["task"].startswith("poll 0 ")} == {
        "shell", "async_status"}


def _kill_sleepers(pattern: "re.Pattern[str]") -> None:
    """SIGKILL every process whose command line matches ``pattern``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as fp:
                cmd = fp.read().replace(b"\0", b" ").decode(errors="replace").strip()
            if pattern.search(cmd):
                os.kill(int(entry), signal.SIGKILL)
        except OSError:
            pass


def test_timeouts_match_vanilla(ansible_env: AnsibleEnv, testbed: Any) -> None:
    """A job past its limit: vanilla's record, its whole process group
    killed. Output that is not JSON: vanilla's record (``cmd`` names the
    module file vanilla would have run), except the traceback in ``msg``
    (see :func:`scrub`).

    Under load, vanilla's async_wrapper sometimes misses the kill of a job
    past its limit (its own race: the job's sleeper survives and the
    playbook fails). Such a vanilla run is not the reference: its leftovers
    are killed and vanilla runs once more."""
    vanilla = play(ansible_env, "async_timeout.yml", LINEAR, "timeout_linear", rc=None)
    if vanilla.rc != 0:
        _kill_sleepers(re.compile(r"(^|[ /])sleep 40\.\d7$"))
        vanilla = play(ansible_env, "async_timeout.yml", LINEAR, "timeout_linear_again")
    ours = play(ansible_env, "async_timeout.yml", MITOGEN, "timeout_mitogen")
    assert vanilla.stats == ours.stats
    assert_same(comparable(vanilla), comparable(ours))
    nojson = "output that is not JSON"
    for host in (h.name for h in testbed.hosts):
        a = results_of(vanilla, nojson)[host]
        b = results_of(ours, nojson)[host]
        assert a["msg"].rstrip().endswith(NO_JSON)
        assert b["msg"].rstrip().endswith(NO_JSON)
        # The module file async_wrapper ran (2.21+: with its interpreter);
        # the job ran as that file, though none was written.
        assert b["cmd"].endswith("/AnsiballZ_msvc_async_probe.py")
        assert b["cmd"].startswith("/usr/bin/python3 /" if ansible_version() >= (2, 21)
                                   else "/")
        assert results_of(ours, "timeout with poll 0, wait")[host]["msg"] == "Timeout exceeded"
        assert results_of(ours, "timeout with a poll after the limit")[host]["msg"] == \
            "Timeout exceeded"


@pytest.mark.parametrize("first, second", [(LINEAR, LINEAR), (MITOGEN, MITOGEN),
                                           (LINEAR, MITOGEN), (MITOGEN, LINEAR)],
                         ids=["vanilla-vanilla", "mitogen-mitogen", "vanilla-mitogen",
                              "mitogen-vanilla"])
def test_job_collected_by_a_later_run(ansible_env: AnsibleEnv, testbed: Any, first: str,
                                      second: str, baseline: Dict[str, Any]) -> None:
    """A job started with poll 0 in one ansible-playbook run (which ends,
    and with it the mux and the agents) is collected in a second run by
    async_status and mitogen_async_status, then cleaned up. Either run may
    be vanilla's: the job file is the same."""
    state = ansible_env.root / ("state-%s-%s" % (first.split(".")[-1], second.split(".")[-1]))
    state.mkdir(exist_ok=True)
    extra = {"state_dir": str(state)}
    play(ansible_env, "async_run1.yml", first, "run1", extra_vars=extra)
    run = play(ansible_env, "async_run2.yml", second, "run2", extra_vars=extra)
    if (first, second) == (LINEAR, LINEAR):
        baseline["run2"] = run
        for result in results_of(run, "async_status of an earlier job").values():
            assert result["stdout"] == "from an earlier run"
        return
    if "run2" not in baseline:
        pytest.skip("the vanilla-vanilla case did not run first")
    assert baseline["run2"].stats == run.stats
    assert_same(comparable(baseline["run2"]), comparable(run))


@pytest.fixture(scope="module")
def baseline() -> Dict[str, Any]:
    """Results shared by the parametrized cases of one test."""
    return {}


def test_job_outlives_reset_and_its_agent(ansible_env: AnsibleEnv, testbed: Any) -> None:
    """A job started before ``meta: reset_connection`` finishes and is
    collected; under mitogen the agent that started the second job is
    killed (SIGKILL) while it runs: the job completes, writes its file, and
    async_status reads it from the target (no result could be pushed)."""
    vanilla = play(ansible_env, "async_lifetime.yml", LINEAR, "lifetime_linear")
    ours = play(ansible_env, "async_lifetime.yml", MITOGEN, "lifetime_mitogen",
                extra_vars={"kill_agent": "true"})
    kill_tasks = ["the agent's pid (the parent of a raw command's shell)", "it is an agent",
                  "kill the agent"]
    assert_same(comparable(vanilla, skip=kill_tasks), comparable(ours, skip=kill_tasks))
    for host in (h.name for h in testbed.hosts):
        assert results_of(ours, "it is an agent")[host]["stdout"] == "1"
        assert results_of(ours, "kill the agent")[host]["rc"] == 0
        assert results_of(ours, "wait for the job")[host]["stdout"] == "survived"
        assert results_of(ours, "what the job file says")[host]["msg"] == "survived"
        assert results_of(ours, "wait for the job started before the reset")[host][
            "stdout"] == "after reset"


def test_polls_after_the_push_send_nothing_to_the_target(ansible_env: AnsibleEnv,
                                                         testbed: Any) -> None:
    """Once a job's result was pushed to the mux, an async_status poll sends
    zero messages to the target (the mux's counters of each agent stream
    do not move over five polls); ``mode: cleanup`` does reach it."""
    run = play(ansible_env, "async_counters.yml", MITOGEN, "counters")
    for host in testbed.hosts:
        name = "ssh.%s" % host.address

        def sent(task: str) -> int:
            counters = results_of(run, task)[host.name]["counters"]
            return int(next(c for c in counters if c["name"] == name)["messages_out"])

        before, after = sent("counters before"), sent("counters after")
        assert after - before == 0, "%d messages to %s in 5 polls" % (after - before, name)
        assert sent("counters after cleanup") > after
        polls = results_of(run, "poll five times")[host.name]["results"]
        assert [p["finished"] for p in polls] == [True] * 5
        assert {p["stdout"] for p in polls} == {"counted"}


def test_task_isolation(ansible_env: AnsibleEnv, testbed: Any) -> None:
    """``mitogen_task_isolation: fork`` runs the module in a fresh child of
    a process forked from the virgin parent for that task alone; by default
    every task's module runs in a fresh child of the one warm zygote."""
    ours = play(ansible_env, "async_isolation.yml", MITOGEN, "isolation_mitogen")
    vanilla = play(ansible_env, "async_isolation.yml", LINEAR, "isolation_linear")
    same = ["fork, a module result"]
    assert_same([e for e in comparable(vanilla) if e["task"] in same],
                [e for e in comparable(ours) if e["task"] in same])
    for host in (h.name for h in testbed.hosts):
        # stdout: the module process's parent, then the module process.
        parents = {task: results_of(ours, task)[host]["stdout_lines"][0]
                   for task in ("zygote, first", "zygote, second", "fork, first",
                                "fork, second")}
        assert parents["zygote, first"] == parents["zygote, second"]
        assert len({parents["zygote, first"], parents["fork, first"],
                    parents["fork, second"]}) == 3


class SyslogListener:
    """Everything logged to ``/dev/log`` (the targets are this machine)
    while it is bound."""

    PATH = "/dev/log"

    def __init__(self) -> None:
        self.lines: List[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.PATH)
        os.chmod(self.PATH, 0o666)  # msvc-bob's modules log too
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            self.lines.append(data.decode("utf-8", "replace"))

    def take(self) -> List[str]:
        lines, self.lines = self.lines, []
        return lines

    def close(self) -> None:
        os.unlink(self.PATH)
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def syslog_listener() -> Iterator[SyslogListener]:
    if os.path.exists(SyslogListener.PATH):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(SyslogListener.PATH)
            pytest.skip("%s: a syslog daemon listens there" % SyslogListener.PATH)
        except ConnectionRefusedError:
            os.unlink(SyslogListener.PATH)  # a socket nobody reads any more
        finally:
            probe.close()
    listener = SyslogListener()
    try:
        yield listener
    finally:
        listener.close()


_SYSLOG_HEAD = re.compile(r"^<\d+>\w{3} [ \d]\d \d\d:\d\d:\d\d ")
_PIDS = re.compile(r"\b\d{2,}\b")


def syslog_lines(raw: List[str]) -> List[str]:
    """The lines jobs and modules logged, without header, job ids, pids
    and temporary paths, sorted (processes log concurrently). Not those of
    async_status: the mux answers some polls without running it."""
    out = []
    for line in raw:
        text = _SYSLOG_HEAD.sub("", line)
        if not text.startswith("ansible-") or "legacy.async_status:" in text:
            continue
        text = re.sub(r"ansible-tmp-[^/ ]+", "ansible-tmp-<t>", JOB_ID.sub("j<jid>", text))
        out.append(_PIDS.sub("<n>", re.sub(r"\bj\d+\b", "j<jid>", text)))
    return sorted(out)


def test_syslog_lines_match_vanilla(ansible_env: AnsibleEnv, testbed: Any,
                                    syslog_listener: SyslogListener) -> None:
    """Job supervisors log async_wrapper's syslog lines (``Invoked with``
    and its arguments, start, every check, the kill, the end), and modules
    their own, as under vanilla."""
    play(ansible_env, "async_syslog.yml", LINEAR, "syslog_linear")
    time.sleep(1.5)  # vanilla's watcher logs the end of a job up to 1 s after the poll
    vanilla = syslog_lines(syslog_listener.take())
    play(ansible_env, "async_syslog.yml", MITOGEN, "syslog_mitogen")
    time.sleep(1.5)
    ours = syslog_lines(syslog_listener.take())
    assert vanilla == ours, compact_diff(vanilla, ours)
    hosts = len(testbed.hosts)
    for line in ("ansible-async_wrapper.py: Timeout reached, now killing <n>",
                 "ansible-async_wrapper.py: Done in kid B.",
                 "ansible-async_wrapper.py: <n> still running (0.0)"):
        assert ours.count(line) == hosts, line
    assert any(line.startswith("ansible-ansible.legacy.command: Invoked with _raw_params=echo "
                               "logged") for line in ours)
