"""Async jobs forked from the virgin fork parent (ansible_mitogen_svc.asyncjob)
and ``isolation="fork"`` of the runner, with real agents and plain Python
programs standing in for AnsiballZ wrappers: no ansible needed.

Test-only, controller side.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import pytest

import test_runner
from ansible_mitogen_svc import Context, Router, call, connect
from ansible_mitogen_svc.jobs import JobResultService

pytestmark = pytest.mark.timeout(120)

ASYNCJOB = "ansible_mitogen_svc.asyncjob"
REMOTE_PYTHON = "/usr/bin/python3"
CONNECT_TIMEOUT = 30.0
RUNNER = "ansible_mitogen_svc.runner"
JOBS = JobResultService.name

#: Stands in for an AnsiballZ wrapper: prints one JSON object about itself.
PROGRAM = """\
import json, os, subprocess, sys, time
p = %(params)r
if p.get("spawn"):
    child = subprocess.Popen(["sleep", "60"])
    with open(p["spawn"], "w") as fp:
        fp.write(str(child.pid))
if p.get("sleep"):
    time.sleep(p["sleep"])
if p.get("junk"):
    print("junk before")
mask = os.umask(0)
print(json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
                  "env": os.environ.get("MSVC_X"), "umask": mask, "stdin": sys.stdin.read()}))
for line in p.get("after", ()):
    print(line)
sys.stdout.flush()
if p.get("stderr"):
    sys.stderr.write(p["stderr"])
"""


def program(**params: Any) -> bytes:
    return (PROGRAM % {"params": params}).encode()


@pytest.fixture
def jobdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="msvc-asyncjob-"))
    os.chmod(path, 0o1777)  # chained agents run as another user
    try:
        yield path
    finally:
        for entry in path.iterdir():
            entry.unlink()
        path.rmdir()


def wait_for(cond: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    return cond()


def start(ctx: Context, data: bytes, directory: Path, env: Optional[Dict[str, str]] = None,
          **job: Any) -> Dict[str, Any]:
    spec = {"jid": "j%d" % (time.monotonic_ns() % 10**12), "limit": 30}
    spec.update(job)
    full_env = {"ANSIBLE_ASYNC_DIR": str(directory)}
    full_env.update(env or {})
    res = ctx.call_function_async(ASYNCJOB, "start_job", data, b"", None, full_env,
                                  spec).get(60.0)
    assert res["stderr"] == b""
    return dict(res, reply=json.loads(res["stdout"]), spec=spec)


def read_record(path: str) -> Dict[str, Any]:
    with open(path) as fp:
        return dict(json.loads(fp.read()))


def final_record(path: str, timeout: float = 30.0) -> Dict[str, Any]:
    def done() -> Optional[Dict[str, Any]]:
        try:
            rec = read_record(path)
        except (OSError, ValueError):
            return None
        return rec if "started" not in rec else None
    rec = wait_for(done, timeout)
    assert rec, "job file %s never got its final record" % path
    return dict(rec)


def local_agent(router: Router) -> Context:
    return connect.local(router, python="/usr/bin/python3", name="jobs",
                         extra_modules=[RUNNER, ASYNCJOB], timeout=30.0)


def agent_for(request: pytest.FixtureRequest, router: Router, transport: str) -> Context:
    """An agent with the job modules shipped at start: the fork parent is
    forked before anything else arrives, and it only runs shipped modules."""
    if transport == "local":
        return local_agent(router)
    from tests.lib.testbed import BOB
    host = request.getfixturevalue("testbed").hosts[0]
    first = connect.ssh(router, host.address, port=host.port, username="root",
                        ssh_args=host.ssh_options(), python=REMOTE_PYTHON,
                        extra_modules=[RUNNER, ASYNCJOB], timeout=CONNECT_TIMEOUT)
    if transport == "ssh":
        return first
    return connect.via(first, ["sudo", "-u", BOB, "--"], python=REMOTE_PYTHON,
                       timeout=CONNECT_TIMEOUT)


@pytest.mark.parametrize("transport", ["local", "ssh", "chained"])
def test_job_writes_vanilla_records_and_pushes_them(request: pytest.FixtureRequest,
                                                     router: Router, controller_pool: Any,
                                                     transport: str, jobdir: Path) -> None:
    agent = agent_for(request, router, transport)
    ctl = router.context(0)
    key = "j%d" % (time.monotonic_ns() % 10**12)
    call(ctl, JOBS, "register", job_id=key, owner=agent.context_id)
    listener = ctl.call_service_async(JOBS, "listen", job_id=key, timeout=60)
    started = start(agent, program(sleep=0.5, junk=True, after=["junk after"],
                                   stderr="oops\n"),
                    jobdir, env={"MSVC_X": "x"}, jid=key, push=key)
    reply = started["reply"]
    jid = reply["ansible_job_id"]
    assert started["rc"] == 0
    assert jid.startswith(key + ".") and jid[len(key) + 1:].isdigit()
    path = str(jobdir / jid)
    assert reply == {"failed": False, "started": True, "finished": False, "ansible_job_id": jid,
                     "results_file": path, "_ansible_suppress_tmpdir_delete": True}
    # Written before start_job returned: async_status finds it at once.
    assert read_record(path) == {"started": True, "finished": False, "ansible_job_id": jid}
    pushed = listener.get(60.0)
    record = final_record(path)
    assert pushed == {"jid": jid, "path": path, "async_dir": str(jobdir),
                      "owner": agent.context_id, "text": json.dumps(record)}
    supervisor = int(jid.rpartition(".")[2])
    info = call(agent, "ansible_mitogen_svc.agent.AgentService", "info")
    assert record["pid"] not in (info["pid"], supervisor)
    assert record["pgid"] == record["pid"]  # its own process group, for the kill
    assert record["sid"] == supervisor != os.getsid(info["pid"])  # detached
    assert record["env"] == "x" and record["stdin"] == "" and record["umask"] == 0o022
    assert record["stderr"] == "oops\n"
    assert record["warnings"] == ["Module invocation had junk after the JSON data: junk after"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert call(ctl, JOBS, "get", job_id=key) == {"state": "finished", "result": pushed}


def test_timeout_kills_the_process_group(router: Router, controller_pool: Any,
                                         jobdir: Path) -> None:
    agent = local_agent(router)
    marker = jobdir / "grandchild.pid"
    key = "j%d" % (time.monotonic_ns() % 10**12)
    call(router.context(0), JOBS, "register", job_id=key, owner=agent.context_id)
    t0 = time.monotonic()
    started = start(agent, program(spawn=str(marker), sleep=60), jobdir, jid=key, push=key,
                    limit=1)
    path = started["reply"]["results_file"]
    record = final_record(path)
    # Vanilla's schedule for a 1 s limit: checks every 0.5 s, the kill at
    # the check at 1 s, the record 1 s after the kill.
    assert time.monotonic() - t0 >= 2.0
    assert record == {"msg": "Timeout exceeded", "failed": True,
                      "child_pid": record["child_pid"]}
    grandchild = int(marker.read_text())
    assert wait_for(lambda: not _alive(record["child_pid"]) and not _alive(grandchild), 10.0)
    pushed = router.context(0).call_service_async(JOBS, "listen", job_id=key,
                                                  timeout=30).get(30.0)
    assert json.loads(pushed["text"]) == record


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as fp:
            return fp.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_job_outlives_its_agent(router: Router, controller_pool: Any, jobdir: Path) -> None:
    agent = local_agent(router)
    key = "j%d" % (time.monotonic_ns() % 10**12)
    call(router.context(0), JOBS, "register", job_id=key, owner=agent.context_id)
    started = start(agent, program(sleep=2), jobdir, jid=key, push=key)
    info = call(agent, "ansible_mitogen_svc.agent.AgentService", "info")
    os.kill(info["pid"], signal.SIGKILL)
    record = final_record(started["reply"]["results_file"])
    assert record["pid"] > 0 and "started" not in record
    # Its result could not be pushed: the job file is the only answer.
    assert call(router.context(0), JOBS, "get", job_id=key)["state"] == "running"


def test_pre_219_records_and_junk_rule(router: Router, jobdir: Path) -> None:
    agent = local_agent(router)
    started = start(agent, program(after=[""]), jobdir, bools=False, blank_junk_warns=True)
    reply = started["reply"]
    assert reply["failed"] == 0 and reply["started"] == 1 and reply["finished"] == 0
    assert type(reply["started"]) is int
    record = final_record(reply["results_file"])
    assert record["warnings"] == ["Module invocation had junk after the JSON data: "]


def test_output_without_json_and_missing_directory(router: Router, jobdir: Path) -> None:
    agent = local_agent(router)
    started = start(agent, b"print('no json')\n", jobdir, cmd="python3 AnsiballZ_x.py")
    record = final_record(started["reply"]["results_file"])
    assert record["failed"] is True and record["cmd"] == "python3 AnsiballZ_x.py"
    assert record["data"] == "no json\n" and record["stderr"] == ""
    assert record["msg"].rstrip().endswith("ValueError: No start of json char found")
    blocker = jobdir / "file"
    blocker.write_text("")
    failed = start(agent, program(), blocker / "sub")
    assert failed["rc"] == 1
    assert failed["reply"]["failed"] is True
    assert failed["reply"]["msg"].startswith("could not create directory: %s/sub - " % blocker)


def test_isolation_fork_uses_a_fresh_child_of_the_virgin_parent(router: Router) -> None:
    target = test_runner.Target(local_agent(router))
    zip_text = test_runner.make_zip()
    warm = target.result({}, zip_text)
    fork = _isolated(target, zip_text)
    again = _isolated(target, zip_text)
    # The zygote imported basic before forking the task; an isolated task
    # imports it itself, in a process that never ran anything else.
    assert warm["loaded_pid"] != warm["pid"]
    assert fork["loaded_pid"] == fork["pid"] and again["loaded_pid"] == again["pid"]
    assert fork["pid"] != again["pid"]


def _isolated(target: Any, zip_text: str) -> Dict[str, Any]:
    data = test_runner.wrapper({}, zip_text)
    part = test_runner.payload.split(data)
    res = target.ctx.call_function_async(
        RUNNER, "run_module", part.head, part.tail, part.digest, {}, test_runner.KEY,
        test_runner.PRELOAD, blob=part.blob, isolation="fork").get(60.0)
    assert res["rc"] == 0, res
    return dict(json.loads(res["stdout"].decode().splitlines()[-1]))
