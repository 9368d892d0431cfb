"""Run ansible-playbook / ansible under vanilla ``linear`` and under
``mitogen.svc.mitogen_linear`` with identical settings.

Benchmark and demo helper, controller side, stdlib only (Ansible itself runs
in its own processes from a venv's bin directory). Used by bench/ansible.py
and docs/examples/demo_playbook/demo.py.

* :class:`Workspace` is a private directory holding
  ``collections/ansible_collections/mitogen/svc`` (a symlink to this
  checkout, or to another copy of the collection), an ``ANSIBLE_HOME`` and an inventory, and builds the
  environment of a run: the two strategies differ in ``ANSIBLE_STRATEGY``
  only. Both get ``ANSIBLE_PIPELINING=True`` and Ansible's default
  ``ssh_args`` (``-C -o ControlMaster=auto -o ControlPersist=60s``), which
  mitogen_ssh ignores the Control* parts of.
* :meth:`Workspace.run` runs one command under bench/_ansible_wrap.py
  (wall time, CPU of every controller process, ControlPersist masters ended
  afterwards) and reads the task results the ``msvc_capture`` callback of
  the integration tests wrote.
* :func:`compare` normalises two runs' results with the integration tests'
  ``_compare`` module: equal means the same task results on every host.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Any, Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
TESTS_LIB = os.path.join(REPO, "tests", "lib")
TESTS_ANSIBLE = os.path.join(REPO, "tests", "integration", "ansible")
CALLBACKS = os.path.join(TESTS_ANSIBLE, "callback_plugins")
WRAPPER = os.path.join(BENCH_DIR, "_ansible_wrap.py")

STRATEGIES = {"vanilla": "linear", "mitogen": "mitogen.svc.mitogen_linear"}
LABELS = {"vanilla": "vanilla linear", "mitogen": "mitogen_linear"}
SSH_ARGS = "-C -o ControlMaster=auto -o ControlPersist=60s"
TARGET_PYTHON = "/usr/bin/python3"


def find_ansible_bin(explicit: Optional[str] = None) -> Optional[str]:
    """The directory holding ansible-playbook: ``explicit``, else the
    directory of the running interpreter (a venv), else the repository's
    test or demo venv, else the PATH."""
    candidates = [explicit] if explicit else [
        os.path.dirname(sys.executable),
        os.path.join(REPO, ".venv", "test", "bin"),
        os.path.join(REPO, ".venv", "demo", "bin"),
    ]
    for d in candidates:
        if d and os.access(os.path.join(d, "ansible-playbook"), os.X_OK):
            return os.path.abspath(d)
    if explicit:
        return None
    found = shutil.which("ansible-playbook")
    return os.path.dirname(found) if found else None


def ansible_version(bin_dir: str) -> str:
    py = os.path.join(bin_dir, "python")
    try:
        r = subprocess.run([py, "-c", "import ansible.release as r, sys; "
                            "print(r.__version__, sys.version.split()[0])"],
                           capture_output=True, text=True, timeout=60)
        core, python = r.stdout.split()
        return "ansible-core %s on Python %s" % (core, python)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return "ansible-core ?"


class Run:
    """One wrapped command: wrapper figures plus captured task results."""

    def __init__(self, wrap: Dict[str, Any], entries: List[Dict[str, Any]],
                 stdout: str, stderr: str) -> None:
        self.wrap = wrap
        self.rc = wrap.get("rc")
        self.wall_s = float(wrap.get("wall_s") or 0.0)
        self.cpu_s = float(wrap.get("user_s", 0.0)) + float(wrap.get("sys_s", 0.0))
        self.results = [e for e in entries if e.get("seq") != "stats"]
        stats = [e for e in entries if e.get("seq") == "stats"]
        self.stats: Dict[str, Dict[str, int]] = stats[-1]["stats"] if stats else {}
        self.stdout = stdout
        self.stderr = stderr

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.wrap.get("timed_out")

    def totals(self) -> Dict[str, int]:
        """ok/changed/failed/... summed over hosts (from the play recap)."""
        out: Dict[str, int] = {}
        for per_host in self.stats.values():
            for k, v in per_host.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def tasks_per_host(self) -> float:
        hosts = {e.get("host") for e in self.results}
        return len(self.results) / len(hosts) if hosts else 0.0

    def failure(self) -> str:
        return "rc=%s\n--- stdout (tail)\n%s\n--- stderr (tail)\n%s" % (
            self.rc, self.stdout[-3000:], self.stderr[-3000:])


class Workspace:
    """Collection symlink, ANSIBLE_HOME and inventory under ``root``."""

    def __init__(self, root: str, bin_dir: str, forks: int = 5,
                 collection: Optional[str] = None) -> None:
        self.root = os.path.abspath(root)
        self.bin_dir = bin_dir
        self.forks = forks
        self.collections = os.path.join(self.root, "collections")
        ns = os.path.join(self.collections, "ansible_collections", "mitogen")
        os.makedirs(ns, exist_ok=True)
        link = os.path.join(ns, "svc")
        if not os.path.islink(link):
            os.symlink(os.path.abspath(collection or REPO), link)
        self.home = os.path.join(self.root, "ansible-home")
        os.makedirs(self.home, exist_ok=True)
        self.inventory = os.path.join(self.root, "inventory.ini")
        self.runs = os.path.join(self.root, "runs")
        os.makedirs(self.runs, exist_ok=True)
        self.count = 0

    def write_inventory(self, hosts: List[Dict[str, Any]], group: str = "targets") -> None:
        """``hosts``: dicts with ``name`` and either ``local=True`` or
        ``address``, ``port``, ``key``, ``known_hosts`` and optionally
        ``alias`` (the ``[addr]:port`` the host key is filed under, when
        ``address:port`` is a proxy in front of the host)."""
        lines = ["[%s]" % group]
        for h in hosts:
            if h.get("local"):
                lines.append("%s ansible_connection=local ansible_python_interpreter=%s"
                             % (h["name"], TARGET_PYTHON))
                continue
            common = ["-o IdentitiesOnly=yes", "-o StrictHostKeyChecking=yes",
                      "-o UserKnownHostsFile=%s" % h["known_hosts"], "-o LogLevel=ERROR"]
            if h.get("alias"):
                common.append("-o HostKeyAlias=%s" % h["alias"])
            lines.append("%s ansible_host=%s ansible_port=%d ansible_user=root "
                         "ansible_ssh_private_key_file=%s ansible_ssh_common_args='%s' "
                         "ansible_python_interpreter=%s"
                         % (h["name"], h["address"], h["port"], h["key"], " ".join(common),
                            TARGET_PYTHON))
        with open(self.inventory, "w") as fp:
            fp.write("\n".join(lines) + "\n")

    def env(self, strategy: str, capture: str) -> Dict[str, str]:
        # Bytecode caches get written, as on a user's machine (pip compiled
        # ansible-core's at install; the collection's are written on first use).
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ANSIBLE_") and k != "PYTHONDONTWRITEBYTECODE"}
        env.update({
            "ANSIBLE_COLLECTIONS_PATH": self.collections,
            "ANSIBLE_HOME": self.home,
            "ANSIBLE_LOCAL_TEMP": os.path.join(self.home, "tmp"),
            "ANSIBLE_CALLBACK_PLUGINS": CALLBACKS,
            "ANSIBLE_CALLBACKS_ENABLED": "msvc_capture",
            "ANSIBLE_STRATEGY": STRATEGIES[strategy],
            "ANSIBLE_INVENTORY": self.inventory,
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "ANSIBLE_FORKS": str(self.forks),
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_SSH_ARGS": SSH_ARGS,
            "ANSIBLE_SSH_CONTROL_PATH_DIR": os.path.join(self.home, "cp"),
            # The capture callback in ad-hoc `ansible` runs too.
            "ANSIBLE_LOAD_CALLBACK_PLUGINS": "True",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "MSVC_CAPTURE_FILE": capture,
        })
        return env

    def run(self, strategy: str, args: List[str], timeout: float = 1200.0,
            tool: str = "ansible-playbook") -> Run:
        """Run ``tool args...`` under ``strategy`` ("vanilla"/"mitogen")."""
        self.count += 1
        base = os.path.join(self.runs, "%03d-%s-%s" % (self.count, strategy, tool))
        capture, result = base + ".jsonl", base + ".wrap.json"
        out, err = base + ".out", base + ".err"
        argv = [sys.executable, WRAPPER, result, out, err, str(timeout), "--",
                os.path.join(self.bin_dir, tool)] + list(args)
        proc = subprocess.Popen(argv, env=self.env(strategy, capture), cwd=self.root,
                                stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout + 120)
        except BaseException:
            # Ctrl-C or SIGTERM: the wrapper stops the command and whatever
            # it left behind; give it the time to.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        if rc != 0:
            raise RuntimeError("%s exited with %s" % (WRAPPER, rc))
        with open(result) as fp:
            wrap = json.load(fp)
        entries = []
        if os.path.exists(capture):
            with open(capture) as fp:
                entries = [json.loads(line) for line in fp if line.strip()]
        texts = []
        for path in (out, err):
            with open(path, errors="replace") as fp:
                texts.append(fp.read())
        return Run(wrap, entries, texts[0], texts[1])


def collection_state(path: str) -> str:
    """The git commit of the collection at ``path``, and whether its
    runtime or plugins have changes not committed yet."""
    try:
        head = subprocess.run(["git", "-C", path, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return "%s (not a git checkout)" % path
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--",
                                "ansible_mitogen_svc", "plugins"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return "%s at %s%s" % (path, head.stdout.strip(),
                               " + uncommitted changes in ansible_mitogen_svc/ or plugins/"
                               if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return path


def compare(a: Run, b: Run) -> Optional[str]:
    """None when both runs gave the same task results (after the
    integration tests' normalisation), else a short description of the
    first difference."""
    if TESTS_ANSIBLE not in sys.path:
        sys.path.insert(0, TESTS_ANSIBLE)
    from _compare import normalise_all  # type: ignore[import-not-found]
    na, nb = normalise_all(a.results), normalise_all(b.results)
    if len(na) != len(nb):
        return "%d results vs %d" % (len(na), len(nb))
    for x, y in zip(na, nb):
        if x != y:
            keys = sorted(k for k in set(x["result"]) | set(y["result"])
                          if x["result"].get(k) != y["result"].get(k))
            return "task %r on %s differs in %s" % (x.get("task"), x.get("host"),
                                                   ", ".join(keys) or "status")
    return None
