"""mitogen_linear against vanilla linear on real sshd targets, and the
lifetime of the mux and agents.

Test-only, controller side. Every scenario runs under vanilla ``linear``
and under ``mitogen.svc.mitogen_linear``; the captured results must be equal
after :mod:`_compare` removed timing fields.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compare import normalise_all  # noqa: E402
from conftest import ANSIBLE_BIN, PLAYBOOKS, AnsibleEnv, run_playbook  # noqa: E402

pytestmark = pytest.mark.timeout(240)

MITOGEN = "mitogen.svc.mitogen_linear"
MUX_COMM = b"msvc-mux"
AGENT_MARK = b"base64.b64decode"


def _cmdline(pid: int) -> bytes:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fp:
            return fp.read()
    except OSError:
        return b""


def _comm(pid: int) -> bytes:
    try:
        with open("/proc/%d/comm" % pid, "rb") as fp:
            return fp.read().strip()
    except OSError:
        return b""


def _environ(pid: int) -> bytes:
    try:
        with open("/proc/%d/environ" % pid, "rb") as fp:
            return fp.read()
    except OSError:
        return b""


def mux_pids(env: AnsibleEnv) -> List[int]:
    """Mux processes started for ``env`` (its private ANSIBLE_HOME)."""
    mark = b"ANSIBLE_HOME=" + str(env.home).encode() + b"\0"
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and _comm(int(p)) == MUX_COMM and mark in _environ(int(p))]


def agent_pids(testbed: Any) -> List[int]:
    """Agents running under the testbed's sshd servers."""
    return [pid for host in testbed.hosts for pid in host.process_tree()
            if AGENT_MARK in _cmdline(pid)]


def wait_until(cond: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return bool(cond())


def _describe(run: Any) -> str:
    return "rc=%s\nstdout:\n%s\nstderr:\n%s" % (run.rc, run.proc.stdout[-4000:],
                                                 run.proc.stderr[-4000:])


@contextlib.contextmanager
def playbook_running(env: AnsibleEnv, playbook: str, capture: Path
                     ) -> Iterator["subprocess.Popen[str]"]:
    """ansible-playbook ``playbook`` under mitogen_linear in the background
    (output on a pipe, results captured in ``capture``); its whole process
    group is killed if it still runs when the block ends."""
    if capture.exists():
        capture.unlink()
    proc = subprocess.Popen([str(ANSIBLE_BIN / "ansible-playbook"), str(PLAYBOOKS / playbook)],
                            env=env.env(MITOGEN, capture), cwd=str(env.root),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def kill_all(pids: List[int]) -> None:
    """SIGKILL each of ``pids``; one that exited meanwhile is no error (a
    task child that just finished, a zygote that saw its agent go)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def running(testbed: Any, argv: bytes) -> int:
    """How many processes under the testbed's sshd servers run ``argv``
    (NUL-separated, as in /proc/PID/cmdline)."""
    return sum(1 for host in testbed.hosts for pid in host.process_tree()
               if _cmdline(pid) == argv)


def test_basics_match_vanilla(ansible_env: AnsibleEnv, testbed: Any) -> None:
    fetched = ansible_env.root / "fetched"
    runs = {}
    for strategy in ("linear", MITOGEN):
        shutil.rmtree(fetched, ignore_errors=True)
        run = run_playbook(ansible_env, "basics.yml", strategy, strategy.replace(".", "_"),
                           extra_vars={"fetch_dir": str(fetched)})
        assert run.rc == 0, _describe(run)
        runs[strategy] = run
    vanilla, ours = runs["linear"], runs[MITOGEN]
    assert len(vanilla.results) == 28
    assert vanilla.stats == ours.stats
    for a, b in zip(normalise_all(vanilla.results), normalise_all(ours.results)):
        assert a == b
    assert len(vanilla.results) == len(ours.results)
    assert wait_until(lambda: not mux_pids(ansible_env) and not agent_pids(testbed)), \
        "mux %s / agents %s left after ansible-playbook exited" % (
            mux_pids(ansible_env), agent_pids(testbed))


def test_short_name_through_shim(ansible_env: AnsibleEnv, testbed: Any) -> None:
    shim = Path(__file__).resolve().parents[3] / "plugins" / "strategy_shim"
    run = run_playbook(ansible_env, "smoke.yml", "mitogen_linear", "shim",
                       extra_env={"ANSIBLE_STRATEGY_PLUGINS": str(shim)})
    assert run.rc == 0, _describe(run)
    assert [r["status"] for r in run.results] == ["ok"] * 4
    assert {r["result"]["stdout"] for r in run.results if r["action"] == "command"} == {"smoke"}


def test_plays_with_and_without_the_strategies_mix(ansible_env: AnsibleEnv,
                                                 testbed: Any) -> None:
    """One playbook: a mitogen_linear play, a vanilla linear play, a
    mitogen_free play. Each play connects the way its strategy says (the
    ESTABLISH lines of -vvv) and every task succeeds."""
    run = run_playbook(ansible_env, "mixed.yml", "linear", "mixed", args=("-vvv",))
    assert run.rc == 0, _describe(run)
    plays = run.proc.stdout.split("\nPLAY [")[1:]
    assert [p.split("]", 1)[0] for p in plays[:3]] == [
        "mixed-1 under mitogen_linear", "mixed-2 under vanilla linear",
        "mixed-3 under mitogen_free"], _describe(run)
    for play, ours in zip(plays, (True, False, True)):
        establish = [ln for ln in play.splitlines() if "ESTABLISH" in ln]
        hosts = {ln.split(">", 1)[0] for ln in establish}
        assert hosts == {"<%s" % h.address for h in testbed.hosts}, play[:3000]
        assert all(("MITOGEN_SSH CONNECTION" in ln) == ours for ln in establish), establish
    assert [(r["task"], r["status"], r["result"]["stdout"]) for r in run.results] == [
        (task, "ok", out) for task, out in (("mixed-1 task", "one"), ("mixed-2 task", "two"),
                                            ("mixed-3 task", "three"))
        for _host in testbed.hosts]


def test_ssh_verbosity_shows_in_a_failed_login(ansible_env: AnsibleEnv, testbed: Any) -> None:
    """``ansible_ssh_verbosity`` gives ssh that many -v: what it says while it
    fails to log in (a user sshd refuses) is in the unreachable message, as
    with vanilla. Its "No such file or directory" lines (known_hosts files)
    do not make mitogen_ssh take it for a missing Python and run the task
    the vanilla way."""
    for strategy in ("linear", MITOGEN):
        run = run_playbook(ansible_env, "ssh_verbosity.yml", strategy,
                           "verbosity-" + strategy.replace(".", "_"))
        assert run.rc == 0, _describe(run)
        msgs = {r["task"]: r["result"]["msg"] for r in run.results}
        assert set(msgs) == {"quiet login", "verbose login"}, msgs
        quiet, verbose = msgs["quiet login"], msgs["verbose login"]
        for msg in (quiet, verbose):
            assert "Failed to connect to the host via ssh: " in msg, (strategy, msg)
            assert msg.rstrip().endswith("Permission denied (publickey,password)."), (strategy,
                                                                                      msg)
        assert "debug1:" not in quiet, (strategy, quiet)
        assert "debug1: Connecting to %s" % testbed.hosts[0].address in verbose, (strategy, verbose)
        assert "debug2: " in verbose and "No such file or directory" in verbose, (strategy,
                                                                                  verbose)
        assert ("auto-mux" in verbose) == (strategy == "linear"), (strategy, verbose)


def test_sigkill_leaves_nothing(ansible_env: AnsibleEnv, testbed: Any) -> None:
    argv = [str(ANSIBLE_BIN / "ansible-playbook"), str(PLAYBOOKS / "sleeper.yml")]
    env = ansible_env.env(MITOGEN, ansible_env.root / "sleeper.jsonl")
    proc = subprocess.Popen(argv, env=env, cwd=str(ansible_env.root), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        assert wait_until(lambda: len(agent_pids(testbed)) >= len(testbed.hosts), 60.0), \
            "agents never started"
        assert mux_pids(ansible_env)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_until(lambda: not mux_pids(ansible_env) and not agent_pids(testbed)), \
            "mux %s / agents %s survived SIGKILL of ansible-playbook" % (
                mux_pids(ansible_env), agent_pids(testbed))
    finally:
        try:  # the orphaned worker still pausing, if any
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_lost_mux_fails_tasks_cleanly(ansible_env: AnsibleEnv, testbed: Any) -> None:
    """The mux killed mid-play: the running task fails on every host with an
    error naming the mux (the workers see its stream close), so does the
    next one (the socket now refuses connections); nothing hangs, and the
    agents the mux owned exit."""
    with playbook_running(ansible_env, "mux_lost.yml", ansible_env.root / "mux_lost.jsonl"
                          ) as proc:
        assert wait_until(lambda: running(testbed, b"sleep\x005\x00") >= len(testbed.hosts),
                          60.0), "the second task never started"
        assert mux_pids(ansible_env)
        for pid in mux_pids(ansible_env):
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    fatal = [ln for ln in out.splitlines() if ln.startswith("fatal: [")]
    for host in testbed.hosts:
        mine = [ln for ln in fatal if ln.startswith("fatal: [%s]" % host.name)]
        assert len(mine) == 2, out
        assert "lost the mitogen.svc mux while talking to %s" % host.address in mine[0], out
        assert "cannot reach %s: the mitogen.svc mux" % host.address in mine[1], out
        assert "did not answer" in mine[1], out
    assert wait_until(lambda: not agent_pids(testbed)), \
        "agents %s outlived their mux" % agent_pids(testbed)


def test_lost_agent_fails_its_task_and_the_next_reconnects(ansible_env: AnsibleEnv,
                                                          testbed: Any) -> None:
    """Agents killed while a task runs: that task is unreachable on every
    host, with an error naming the host and the lost agent; the next task
    starts a fresh agent and succeeds. Agents killed between tasks: the next
    task does not notice. Nothing hangs; no agent is left at the end."""
    capture = ansible_env.root / "agent_lost.jsonl"
    hosts = len(testbed.hosts)
    with playbook_running(ansible_env, "agent_lost.yml", capture) as proc:
        assert wait_until(lambda: running(testbed, b"sleep\x005\x00") >= hosts, 60.0), \
            "the second task never started"
        first = agent_pids(testbed)
        assert first
        kill_all(first)
        assert wait_until(lambda: running(testbed, b"sleep\x003\x00") >= hosts, 60.0), \
            "no task ran after the agents were lost"
        assert wait_until(lambda: running(testbed, b"sleep\x003\x00") == 0, 30.0)
        time.sleep(1.0)  # the results are back: the pause has begun
        second = agent_pids(testbed)
        assert second and not set(first) & set(second)
        kill_all(second)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    results = [json.loads(line) for line in capture.read_text().splitlines() if line]
    by_task: Dict[str, Dict[str, Any]] = {}
    for entry in results:
        if entry.get("seq") != "stats":
            by_task.setdefault(entry["task"], {})[entry["host"]] = entry
    lost = by_task["the test kills the agents while this runs"]
    for host in testbed.hosts:
        assert lost[host.name]["status"] == "unreachable", lost
        assert ("mitogen.svc agent on %s was lost" % host.address
                in lost[host.name]["result"]["msg"]), lost
        for task in ("reconnects after a loss during a task",
                     "reconnects after a loss between tasks"):
            assert by_task[task][host.name]["status"] == "ok", by_task[task]
        assert by_task["reconnects after a loss between tasks"][host.name][
            "result"]["stdout"] == "again"
    assert wait_until(lambda: not agent_pids(testbed)), \
        "agents %s left after ansible-playbook exited" % agent_pids(testbed)


def test_fresh_agent_gets_the_module_with_the_first_call(ansible_env: AnsibleEnv,
                                                         testbed: Any) -> None:
    """The worker the mux answers first for a new agent sends the module zip
    with its first call: one message to the agent, not a call answered
    "missing" and a second call carrying the zip (and the mux no longer
    asks a new agent for its interpreter: the handshake says it)."""
    run = run_playbook(ansible_env, "cold_task.yml", MITOGEN, "cold")
    assert run.rc == 0, _describe(run)
    counters = {r["host"]: r["result"]["counters"] for r in run.results
                if r["task"] == "counters after it"}
    assert set(counters) == {h.name for h in testbed.hosts}
    for host in testbed.hosts:
        name = "ssh.%s" % host.address
        mine = [c for c in counters[host.name] if c["name"] == name]
        assert len(mine) == 1, counters[host.name]
        assert (mine[0]["messages_out"], mine[0]["messages_in"]) == (1, 1), mine[0]


class _DropListener:
    """A TCP port that closes every connection once the client said hello
    (ssh then fails with status 255), counting them."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # timeout: look at the flag again
                continue
            self.accepted += 1
            conn.settimeout(5.0)
            try:  # read ssh's banner: closing with unread data would reset
                conn.recv(4096)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10.0)
        self.sock.close()


@pytest.mark.parametrize("retries", [0, 2])
def test_login_attempts_match_vanilla(ansible_env: AnsibleEnv, testbed: Any,
                                      retries: int) -> None:
    """As many logins as vanilla: one per module task (a failure seen while
    the module was built is not tried again), and ``reconnection_retries``
    (``ansible_ssh_retries``) more when ssh itself fails (status 255)."""
    counts, messages = {}, {}
    for strategy in ("linear", MITOGEN):
        listener = _DropListener(testbed.hosts[0].address)
        try:
            run = run_playbook(ansible_env, "login_attempts.yml", strategy,
                               "attempts%d_%s" % (retries, strategy.replace(".", "_")),
                               extra_vars={"target": testbed.hosts[0].name,
                                           "drop_port": str(listener.port),
                                           "retries": str(retries)})
        finally:
            listener.close()
        assert run.rc == 0, _describe(run)
        (result,) = run.results
        assert result["status"] == "unreachable", result
        counts[strategy] = listener.accepted
        messages[strategy] = result["result"]["msg"].replace(str(listener.port), "PORT")
    assert counts == {"linear": retries + 1, MITOGEN: retries + 1}
    assert messages[MITOGEN] == messages["linear"]
