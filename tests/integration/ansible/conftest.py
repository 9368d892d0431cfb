"""Fixtures of the Ansible integration tests: sshd targets, an installed
collection, an inventory and a runner for ansible-playbook.

Test-only, controller side.

* ``testbed`` (module): sshd hosts from tests/lib/testbed.py, ``HOSTS`` of
  them unless the test module sets ``TESTBED_HOSTS``, in a private
  directory under /tmp (removed afterwards).
* ``ansible_env`` (module): a temporary ``ANSIBLE_COLLECTIONS_PATH`` holding
  ``ansible_collections/mitogen/svc`` -> this repository, an inventory of
  the testbed hosts (root, /usr/bin/python3) and a private ``ANSIBLE_HOME``.
  :class:`AnsibleEnv` takes extra inventory text for modules that need more
  hosts or groups (see test_scenarios.py).
* :func:`run_playbook` runs ``ansible-playbook`` (one or several playbooks,
  extra command line arguments) from the test venv with the ``msvc_capture``
  callback and returns the captured results.
* :func:`ansible_version` is the ansible-core version of ``ANSIBLE_BIN``.
* The ``smoke`` marker selects the subset CI runs on older ansible-core.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
ANSIBLE_BIN = Path(os.environ.get("MSVC_ANSIBLE_BIN", REPO / ".venv" / "test" / "bin"))
PLAYBOOKS = HERE / "playbooks"
HOSTS = 2


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "smoke: the small Ansible subset CI also runs on older ansible-core")


@functools.lru_cache(maxsize=None)
def ansible_version() -> Tuple[int, ...]:
    """(major, minor, patch) of the ansible-core next to ``ANSIBLE_BIN``."""
    proc = subprocess.run([str(ANSIBLE_BIN / "python"), "-c",
                           "import ansible.release as r; print(r.__version__)"],
                          capture_output=True, text=True, timeout=60, check=True)
    parts = []
    for piece in proc.stdout.strip().split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def ansible_available() -> Optional[str]:
    if not (ANSIBLE_BIN / "ansible-playbook").exists():
        return "no ansible-playbook in %s" % ANSIBLE_BIN
    return None


@pytest.fixture(scope="module")
def testbed(request: pytest.FixtureRequest, leak_exemptions: Any) -> Iterator[Any]:
    why = ansible_available()
    if why:
        pytest.skip(why)
    from tests.lib.testbed import Testbed, TestbedError
    ok, reason = Testbed.available()
    if not ok:
        pytest.skip("sshd testbed unavailable: %s" % reason)
    count = getattr(request.module, "TESTBED_HOSTS", HOSTS)
    # Not under pytest's basetemp: every pytest session resets
    # /tmp/pytest-of-root to 0700, which would lock msvc-alice and msvc-bob
    # out of their authorized_keys while another session starts.
    workdir = Path(tempfile.mkdtemp(prefix="msvc-ansible-testbed-"))
    tb = Testbed(workdir, count=count)
    try:
        try:
            tb.start()
        except (TestbedError, OSError) as exc:
            pytest.skip("sshd testbed cannot run: %s" % exc)
        for host in tb.hosts:
            for pid in host.process_tree():
                leak_exemptions.add_process(pid)
        yield tb
    finally:
        tb.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class AnsibleEnv:
    """Where the collection, inventory and Ansible state live for a module."""

    def __init__(self, root: Path, testbed: Any, extra_inventory: str = "") -> None:
        self.root = root
        coll = root / "collections" / "ansible_collections" / "mitogen"
        coll.mkdir(parents=True)
        (coll / "svc").symlink_to(REPO)
        self.collections = root / "collections"
        self.home = root / "ansible-home"
        self.home.mkdir()
        self.inventory = root / "inventory.ini"
        lines = ["[targets]"]
        for host in testbed.hosts:
            lines.append("%s %s" % (host.name, self.host_vars(host)))
        lines += ["", "[local]", "localhost ansible_connection=local "
                  "ansible_python_interpreter=%s" % sys.executable]
        if extra_inventory:
            lines += ["", extra_inventory.strip()]
        self.inventory.write_text("\n".join(lines) + "\n")

    @staticmethod
    def common_args(host: Any) -> str:
        """The ssh options every inventory entry of ``host`` uses."""
        return " ".join(["-o IdentitiesOnly=yes", "-o StrictHostKeyChecking=yes",
                         "-o UserKnownHostsFile=%s" % host.known_hosts_path,
                         "-o LogLevel=ERROR"])

    @classmethod
    def host_vars(cls, host: Any, user: str = "root",
                  python: str = "/usr/bin/python3") -> str:
        """Inventory variables reaching testbed ``host`` as ``user``."""
        return ("ansible_host=%s ansible_port=%d ansible_user=%s "
                "ansible_ssh_private_key_file=%s ansible_ssh_common_args='%s' "
                "ansible_python_interpreter=%s"
                % (host.address, host.port, user, host.key_path, cls.common_args(host), python))

    def env(self, strategy: str, capture: Path, extra: Optional[Dict[str, str]] = None
            ) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update({
            "ANSIBLE_COLLECTIONS_PATH": str(self.collections),
            "ANSIBLE_HOME": str(self.home),
            "ANSIBLE_LOCAL_TEMP": str(self.home / "tmp"),
            "ANSIBLE_CALLBACK_PLUGINS": str(HERE / "callback_plugins"),
            "ANSIBLE_CALLBACKS_ENABLED": "msvc_capture",
            "ANSIBLE_STRATEGY": strategy,
            "ANSIBLE_INVENTORY": str(self.inventory),
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "ANSIBLE_FORKS": "4",
            # Vanilla's default keeps an ssh master (and an sshd session on the
            # target) for 60 s after the run; the suite must leave nothing,
            # so masters here linger 2 s (still shared between tasks).
            "ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=2s",
            "MSVC_CAPTURE_FILE": str(capture),
        })
        env.update(extra or {})
        return env


@pytest.fixture(scope="module")
def ansible_env(tmp_path_factory: pytest.TempPathFactory, testbed: Any) -> AnsibleEnv:
    return AnsibleEnv(tmp_path_factory.mktemp("ansible-env"), testbed)


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, entries: List[Dict[str, Any]]) -> None:
        self.proc = proc
        self.rc = proc.returncode
        self.results = [e for e in entries if e.get("seq") != "stats"]
        stats = [e for e in entries if e.get("seq") == "stats"]
        self.stats = stats[-1]["stats"] if stats else None


def run_playbook(env: AnsibleEnv, playbook: Union[str, Path, Sequence[Union[str, Path]]],
                 strategy: str, tag: str, extra_vars: Optional[Dict[str, str]] = None,
                 timeout: float = 120.0, extra_env: Optional[Dict[str, str]] = None,
                 args: Sequence[str] = ()) -> Run:
    """Run ``playbook`` (a name under playbooks/, an absolute path, or a list
    of them: one ansible-playbook process runs them in order) with
    ``strategy`` as the default strategy and extra command line ``args``."""
    books = [playbook] if isinstance(playbook, (str, Path)) else list(playbook)
    stem = Path(books[0]).stem if len(books) == 1 else "multi"
    capture = env.root / ("%s.%s.jsonl" % (stem, tag))
    if capture.exists():
        capture.unlink()
    argv = [str(ANSIBLE_BIN / "ansible-playbook")] + [str(PLAYBOOKS / b) for b in books]
    argv += list(args)
    for k, v in (extra_vars or {}).items():
        argv += ["-e", "%s=%s" % (k, v)]
    proc = subprocess.run(argv, env=env.env(strategy, capture, extra_env), cwd=str(env.root),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    entries = []
    if capture.exists():
        entries = [json.loads(line) for line in capture.read_text().splitlines() if line]
    return Run(proc, entries)
