"""Module execution in children of the agent's zygote (ansible_mitogen_svc.runner),
with a hand-made AnsiballZ-like wrapper: no ansible needed, real agents,
real forks."""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import signal
import threading
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from ansible_mitogen_svc import Context, Router, connect

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[3]
RUNNER = "ansible_mitogen_svc.runner"
PRELOAD = ["ansible.module_utils.basic"]
KEY = "test-key"

_spec = importlib.util.spec_from_file_location(
    "msvc_payload", REPO / "plugins" / "plugin_utils" / "_payload.py")
assert _spec is not None and _spec.loader is not None
payload = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(payload)

BASIC = """\
import os
STATE = {"n": 0}
LOADED_PID = os.getpid()
PARAMS = None
"""
MODULE = """\
import json, os, sys, time
from ansible.module_utils import basic
p = basic.PARAMS
basic.STATE["n"] += 1
out = {"n": basic.STATE["n"], "pid": os.getpid(), "loaded_pid": basic.LOADED_PID,
       "env": os.environ.get("MSVC_X"), "argv": sys.argv[1:], "start": time.time()}
if p.get("import_extra"):
    from ansible.module_utils import extra
    out["extra"] = extra.VALUE
if p.get("sleep"):
    time.sleep(p["sleep"])
out["end"] = time.time()
if p.get("code_hits"):
    out["code_hits"] = sys.modules["ansible_mitogen_svc.runner"]._code_hits[0]
if p.get("tty"):
    out["isatty"] = [os.isatty(0), os.isatty(1), os.isatty(2)]
    out["ssh_tty"], out["term"] = os.environ.get("SSH_TTY"), os.environ.get("TERM")
    try:
        os.close(os.open("/dev/tty", os.O_RDWR))  # only with a controlling terminal
        out["ctty"] = True
    except OSError:
        out["ctty"] = False
if p.get("leave_behind"):  # a process that keeps our stdout, in its own session
    import subprocess
    out["left"] = subprocess.Popen(["sleep", "120"], start_new_session=True).pid
if p.get("unflushed"):
    print("line before _exit")
    os._exit(5)
if p.get("junk"):
    print("junk before")
print(json.dumps(out))
sys.stdout.flush()
if p.get("stderr"):
    sys.stderr.write(p["stderr"])
if p.get("kill"):
    os.kill(os.getpid(), 9)
if p.get("hook"):  # as ansible's file module reports its own errors
    def hook(kind, value, tb):
        print(json.dumps({"failed": True, "hooked": str(value)}))
        sys.exit(p["hook"])
    sys.excepthook = hook
if p.get("raise"):
    raise ValueError("raised by the probe")
sys.exit(p.get("exit", 0))
"""
WRAPPER = """\
_ANSIBALLZ_WRAPPER = True
import base64, os, runpy, shutil, sys, tempfile


def _main(zip_data, params):
    tmp = tempfile.mkdtemp(prefix="fake_ansiballz_")
    try:
        path = os.path.join(tmp, "payload.zip")
        with open(path, "wb") as fp:
            fp.write(base64.b64decode(zip_data))
        sys.path.insert(0, path)
        from ansible.module_utils import basic
        basic.PARAMS = params
        runpy.run_module("ansible.modules.probe", run_name="__main__", alter_sys=True)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    _main(params=%(params)r, zip_data=%(zip)r)
"""


def make_zip(extra: bool = False) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ansible/__init__.py", "")
        zf.writestr("ansible/module_utils/__init__.py", "")
        zf.writestr("ansible/module_utils/basic.py", BASIC)
        zf.writestr("ansible/modules/__init__.py", "")
        zf.writestr("ansible/modules/probe.py", MODULE)
        if extra:
            zf.writestr("ansible/module_utils/extra.py", "VALUE = 'from the task zip'\n")
        # Incompressible padding: a real module zip is far bigger than this.
        zf.writestr("ansible/padding.bin", os.urandom(8192))
    return base64.b64encode(buf.getvalue()).decode()


def wrapper(params: Dict[str, Any], zip_text: str) -> bytes:
    return (WRAPPER % {"params": params, "zip": zip_text}).encode()


class Target:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def run(self, data: bytes, env: Optional[Dict[str, str]] = None,
            send_blob: bool = False, **opts: Any) -> Dict[str, Any]:
        part = payload.split(data)
        args = (part.head, part.tail, part.digest, env or {}, KEY, PRELOAD)
        kwargs = dict(opts, blob=part.blob) if send_blob else opts
        res = self.ctx.call_function_async(RUNNER, "run_module", *args, **kwargs).get(60.0)
        if "missing" in res and not send_blob:
            return self.run(data, env, send_blob=True, **opts)
        return dict(res)

    def result(self, params: Dict[str, Any], zip_text: str, **kw: Any) -> Dict[str, Any]:
        res = self.run(wrapper(params, zip_text), **kw)
        assert res["rc"] == 0, res
        return dict(json.loads(res["stdout"].decode().splitlines()[-1]))


@pytest.fixture
def target(router: Router) -> Target:
    return Target(connect.local(router, python="/usr/bin/python3", name="runner",
                                extra_modules=[RUNNER], timeout=30.0))


def test_split_finds_the_zip() -> None:
    zip_text = make_zip()
    data = wrapper({"a": 1}, zip_text)
    part = payload.split(data)
    assert part.blob == zip_text.encode()
    assert part.head + part.blob + part.tail == data
    assert payload.split(b"print(1)\n").digest is None


def test_zip_is_sent_once_then_cached(target: Target) -> None:
    zip_text = make_zip()
    data = wrapper({}, zip_text)
    part = payload.split(data)
    first = target.ctx.call_function_async(RUNNER, "run_module", part.head, part.tail,
                                           part.digest, {}, KEY, PRELOAD).get(30.0)
    assert first == {"missing": part.digest}
    assert target.run(data, send_blob=True)["rc"] == 0
    again = target.ctx.call_function_async(RUNNER, "run_module", part.head, part.tail,
                                           part.digest, {}, KEY, PRELOAD).get(30.0)
    assert again["rc"] == 0 and json.loads(again["stdout"])["n"] == 1


def test_module_runs_in_a_fresh_child_of_a_warm_zygote(target: Target) -> None:
    zip_text = make_zip()
    a = target.result({}, zip_text, env={"MSVC_X": "one"})
    b = target.result({}, zip_text)
    # basic was imported once, in the zygote, before either child forked.
    assert a["loaded_pid"] == b["loaded_pid"] != a["pid"] != b["pid"]
    # State a module changes dies with its child; env is per task.
    assert (a["n"], b["n"]) == (1, 1)
    assert (a["env"], b["env"]) == ("one", None)
    assert a["argv"] == []


def test_exit_codes_signals_stderr_and_junk(target: Target) -> None:
    zip_text = make_zip()
    res = target.run(wrapper({"exit": 3, "stderr": "oops\n", "junk": True}, zip_text))
    assert res["rc"] == 3
    assert res["stderr"] == b"oops\n"
    assert res["stdout"].startswith(b"junk before\n{")
    # Killed: reported as /bin/sh reports it (dash: "Killed").
    killed = target.run(wrapper({"kill": True}, zip_text))
    assert killed["rc"] == 128 + signal.SIGKILL
    dash = os.path.basename(os.path.realpath("/bin/sh")) == "dash"
    assert killed["stderr"] == (b"Killed\n" if dash else b"")


def test_tty_merges_output_as_ssh_tt_does(target: Target) -> None:
    zip_text = make_zip()
    res = target.run(wrapper({"tty": True, "exit": 3, "stderr": "oops\n", "junk": True},
                             zip_text), tty=True, term="xterm-test")
    assert res["rc"] == 3 and res["stderr"] == b""
    junk, line, err, rest = res["stdout"].split(b"\r\n")
    assert (junk, err, rest) == (b"junk before", b"oops", b"")
    seen = json.loads(line)
    assert seen["isatty"] == [True, True, True] and seen["ctty"] is True
    assert seen["ssh_tty"].startswith("/dev/pts/") and seen["term"] == "xterm-test"
    # Line-buffered as on a terminal: a printed line survives os._exit.
    res = target.run(wrapper({"unflushed": True}, zip_text), env={"PYTHONUNBUFFERED": ""},
                     tty=True)
    assert (res["rc"], res["stdout"]) == (5, b"line before _exit\r\n")
    killed = target.run(wrapper({"kill": True}, zip_text), tty=True)
    dash = os.path.basename(os.path.realpath("/bin/sh")) == "dash"
    assert killed["rc"] == 128 + signal.SIGKILL and killed["stderr"] == b""
    assert killed["stdout"].endswith(b"}\r\nKilled\r\n" if dash else b"}\r\n")
    # A process left holding the pty does not hold the task (sshd's way).
    left = target.result({"leave_behind": True}, zip_text, tty=True)["left"]
    try:
        assert os.path.exists("/proc/%d" % left)
    finally:
        os.kill(left, signal.SIGKILL)
    # Without tty: pipes, nothing of the above.
    quiet = {"PYTHONUNBUFFERED": ""}  # empty: unset for Python
    res = target.run(wrapper({"unflushed": True}, zip_text), env=quiet)
    assert (res["rc"], res["stdout"]) == (5, b"")
    # ... unless PYTHONUNBUFFERED says so, as for a new python3.
    res = target.run(wrapper({"unflushed": True}, zip_text), env={"PYTHONUNBUFFERED": "1"})
    assert (res["rc"], res["stdout"]) == (5, b"line before _exit\n")
    plain = target.result({"tty": True}, zip_text)
    assert plain["isatty"] == [False, False, False] and plain["ctty"] is False
    assert plain["ssh_tty"] is None


def test_uncaught_exceptions_as_the_interpreter_reports_them(target: Target) -> None:
    zip_text = make_zip()
    res = target.run(wrapper({"raise": True}, zip_text))
    assert res["rc"] == 1
    err = res["stderr"].decode()
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.endswith("ValueError: raised by the probe\n")
    assert "runner.py" not in err  # none of our frames
    res = target.run(wrapper({"raise": True, "hook": 4}, zip_text))
    assert res["rc"] == 4 and res["stderr"] == b""
    assert json.loads(res["stdout"].splitlines()[-1]) == {
        "failed": True, "hooked": "raised by the probe"}


def test_submodule_only_in_a_later_zip(target: Target) -> None:
    target.result({}, make_zip())  # the zygote preloads from this zip
    res = target.result({"import_extra": True}, make_zip(extra=True))
    assert res["extra"] == "from the task zip"


def test_zygote_killed_is_replaced(target: Target) -> None:
    zip_text = make_zip()
    first = target.result({}, zip_text)
    os.kill(first["loaded_pid"], signal.SIGKILL)
    second = target.result({}, zip_text)
    assert second["loaded_pid"] != first["loaded_pid"]


def test_tasks_run_concurrently(target: Target) -> None:
    zip_text = make_zip()
    target.result({}, zip_text)
    results: List[Dict[str, Any]] = []

    def one() -> None:
        results.append(target.result({"sleep": 1.0}, zip_text))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(results) == 4
    # Every run started before any other ended: none waited for another.
    assert max(r["start"] for r in results) < min(r["end"] for r in results)


def test_module_code_is_compiled_once_per_agent(target: Target) -> None:
    """The zygote compiles a zip's sources (those not preloaded) before it
    forks the task's child; children take that code from zipimport instead
    of compiling the source, under the file name their own zip gives it
    (tracebacks name the task's zip)."""
    first = target.result({"code_hits": True}, make_zip())
    # The probe module itself came from the zygote's code.
    assert first["code_hits"] >= 1
    programs = [wrapper({"raise": True}, make_zip()) for _ in range(2)]
    results = [target.run(data) for data in programs]
    assert [res["rc"] for res in results] == [1, 1]
    # Same source, other zips: each traceback names its own task's zip.
    for data, res in zip(programs, results):
        frames = [line for line in res["stderr"].decode().splitlines() if "probe.py" in line]
        digest = payload.split(data).digest
        assert frames and all(digest in line for line in frames), (digest, frames)
