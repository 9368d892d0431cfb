"""The scenario suite: every playbook under scenarios/ runs under vanilla
``linear`` (or ``free``) and under ``mitogen.svc.mitogen_linear`` (or
``mitogen_free``); the captured results, the play recap and the rc of
ansible-playbook must be equal after :mod:`_compare` normalised them.

Test-only, controller side.

* Each ``sNN_*.yml`` is one scenario; every task name starts with ``sNN ``
  so results map back to their scenario. Scenarios are grouped: one
  ansible-playbook process runs a group's playbooks in order (a pytest
  param per group). A playbook that ends with failed or unreachable hosts
  stops the run, so such a scenario is the last of its group.
* The vanilla and the mitogen run of a group run at the same time (except
  for the timing-sensitive groups), each with its own scratch and fetch
  directories, whose paths are replaced by placeholders before comparing.
* The vanilla run must behave as the scenarios intend (expected rc, every
  scenario ran, the playbooks' own ``assert`` tasks pass) before anything
  is compared.
* A failure shows, per diverging scenario, the first differing result of
  each host (task, status, compact JSON diff), the recap and rc differences,
  and which scenarios an early failure kept from running.
* Groups marked smoke (``pytest -m smoke``) are the subset CI also runs on
  ansible-core 2.19.
* The concurrency scenarios are checked by barriers in the playbooks and
  from the captured command start and end times (their order and overlap),
  never from wall-clock durations.

Environment knobs, for diagnosis only:

* ``MSVC_SCENARIOS_SOLO=1``: one ansible-playbook run per scenario, so a
  diverging scenario cannot hide the ones after it (slower).
* ``MSVC_SCENARIOS_VANILLA_TWICE=1``: the second run is vanilla too; shows
  what differs between two vanilla runs (what normalising may remove).
* ``MSVC_SCENARIOS_KEEP=DIR``: copy the captured JSON lines there.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import glob
import gzip
import io
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compare import first_difference, per_host, scenario_id, substitute, task_order  # noqa: E402
from conftest import AnsibleEnv, Run, ansible_version, run_playbook  # noqa: E402

TESTBED_HOSTS = 4
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
MITOGEN_LINEAR = "mitogen.svc.mitogen_linear"
MITOGEN_FREE = "mitogen.svc.mitogen_free"
MITOGEN_HOST_PINNED = "mitogen.svc.mitogen_host_pinned"
#: Seconds one ansible-playbook run of a group may take (generous: the
#: machine running the suite may be busy with other tests).
RUN_TIMEOUT = 600.0

#: Hosts whose first difference a diverging scenario shows in full.
SHOW_HOSTS = 3

pytestmark = pytest.mark.timeout(2 * RUN_TIMEOUT + 60)

Check = Callable[[Run], List[str]]


def _times(run: Run, task: str) -> Dict[str, Tuple[datetime.datetime, datetime.datetime]]:
    """host -> (start, end) of the command results of ``task``."""
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    out = {}
    for e in run.results:
        r = e["result"]
        if e["task"] == task and "start" in r and "end" in r:
            out[e["host"]] = (datetime.datetime.strptime(r["start"], fmt),
                              datetime.datetime.strptime(r["end"], fmt))
    return out


def check_sleeps_overlap(run: Run) -> List[str]:
    """s56: the ten delegated sleeps ran at the same time: some instant lies
    inside every [start, end] interval."""
    spans = _times(run, "s56 sleep 2 on localhost")
    if len(spans) != 10:
        return ["s56: expected 10 timed sleep results, got %d" % len(spans)]
    latest_start = max(s for s, _ in spans.values())
    earliest_end = min(e for _, e in spans.values())
    if latest_start < earliest_end:
        return []
    order = sorted(spans.items(), key=lambda kv: kv[1][0])
    return ["s56: the 10 sleeps did not all overlap (the last started %s, after the first "
            "ended at %s); intervals by start: %s" % (
                latest_start.time(), earliest_end.time(),
                ", ".join("%s %s-%s" % (h, s.time(), e.time()) for h, (s, e) in order))]


def check_free_runs_ahead(run: Run) -> List[str]:
    """s57: under a free strategy host2 started its next task while host1
    was still waiting in its first one."""
    slow = _times(run, "s57 host1 waits for host2").get("host1")
    ahead = _times(run, "s57 next task").get("host2")
    if slow is None or ahead is None:
        return ["s57: missing timed results (host1 wait %s, host2 next task %s)" % (slow, ahead)]
    if ahead[0] < slow[1]:
        return []
    return ["s57: host2's next task started at %s, after host1's wait ended at %s: "
            "the strategy did not let hosts run ahead" % (ahead[0].time(), slow[1].time())]


def check_hosts_stay_pinned(run: Run) -> List[str]:
    """s62: with 2 forks, host3 and host4 began only after host1 or host2
    had run its last task."""
    first = _times(run, "s62 first task")
    last = _times(run, "s62 last task")
    if len(first) != 4 or not {"host1", "host2"} <= set(last):
        return ["s62: missing timed results (first task %s, last task %s)" % (
            sorted(first), sorted(last))]
    done = min(last[h][1] for h in ("host1", "host2"))
    early = ["%s at %s" % (h, first[h][0].time()) for h in ("host3", "host4")
             if first[h][0] < done]
    if not early:
        return []
    return ["s62: %s began before host1 or host2 was done (%s): the strategy did not "
            "keep hosts pinned" % (", ".join(early), done.time())]


@dataclasses.dataclass(frozen=True)
class Group:
    """Scenarios run by one ansible-playbook process."""

    name: str
    scenarios: Tuple[str, ...]
    #: rc vanilla ansible-playbook must return (that of the last scenario).
    rc: int = 0
    args: Tuple[str, ...] = ()
    strategies: Tuple[str, str] = ("linear", MITOGEN_LINEAR)
    env: Tuple[Tuple[str, str], ...] = ()
    smoke: bool = False
    #: Compare the (task, hosts) step order, which only linear fixes.
    ordered: bool = True
    checks: Tuple[Check, ...] = ()
    #: (scenario, gate): the scenario runs only when gate() returns None,
    #: else the reason it does not apply here.
    only_if: Tuple[Tuple[str, Callable[[], Optional[str]]], ...] = ()
    #: Run vanilla and mitogen at the same time (not for timing checks).
    parallel: bool = True


def _needs_py38() -> Optional[str]:
    if ansible_version() > (2, 19, 99):
        return "ansible-core %s no longer supports Python 3.8 targets" % (
            ".".join(map(str, ansible_version())))
    return None


def _needs_219() -> Optional[str]:
    if ansible_version() < (2, 19):
        return "ansible-core %s has no private_key option" % (
            ".".join(map(str, ansible_version())))
    return None


#: SoftHSM's PKCS#11 library (Debian's softhsm2, which scripts/testbed-deps.sh
#: installs): a smart card in software for the pkcs11_provider scenario.
SOFTHSM_LIB = "/usr/lib/softhsm/libsofthsm2.so"
CARD_PIN = "4711-pin"


def _needs_softhsm() -> Optional[str]:
    if not os.path.exists(SOFTHSM_LIB) or not shutil.which("softhsm2-util"):
        return "no SoftHSM (%s) on this machine" % SOFTHSM_LIB
    return None


GROUPS: Tuple[Group, ...] = (
    Group("connection", ("s01_conn_port", "s02_conn_user", "s03_conn_private_key",
                         "s04_conn_ssh_args", "s05_conn_timeout", "s06_reset_connection")),
    Group("modules", ("s07_check_mode_task", "s08_diff_task", "s09_no_log", "s10_warnings",
                      "s11_environment", "s12_module_oldstyle", "s13_module_want_json",
                      "s14_module_script", "s15_module_junk", "s16_module_failing",
                      "s17_module_exception")),
    Group("module-crash", ("s66_module_crash", "s67_left_behind")),
    Group("module-crash-pipelined", ("s66_module_crash",),
          env=(("ANSIBLE_PIPELINING", "True"),)),
    Group("actions-1", ("s18_raw", "s19_script", "s20_copy_small", "s21_copy_big",
                        "s22_copy_dir", "s23_copy_content", "s24_template", "s25_fetch")),
    Group("actions-2", ("s26_slurp", "s27_assemble", "s28_unarchive", "s29_lineinfile",
                        "s30_file", "s31_stat", "s32_command_shell", "s33_setup")),
    Group("become", ("s34_become_sudo_nopass", "s39_become_fqcn"), smoke=True),
    Group("become-password", ("s35_become_sudo_password", "s36_become_wrong_password",
                              "s37_become_su", "s38_become_doas")),
    Group("playbook", ("s40_delegate", "s41_local_action", "s42_run_once", "s43_serial",
                       "s45_handlers", "s46_include_import", "s47_loops", "s51_registered",
                       "s54_errors", "s55_blocks", "s44_any_errors_fatal"), rc=2),
    Group("unreachable", ("s53_ignore_unreachable", "s52_unreachable"), rc=4, smoke=True),
    Group("ssh-password", ("s60_ssh_password",), env=(("ANSIBLE_PIPELINING", "True"),)),
    # ssh-agent's socket lives in the local temp dir: a short one (the
    # test's own is too long for a unix socket path).
    Group("key-content", ("s61_private_key_content",),
          env=(("ANSIBLE_SSH_AGENT", "auto"), ("ANSIBLE_LOCAL_TEMP", "/tmp")),
          only_if=(("s61_private_key_content", _needs_219),)),
    Group("smart-card", ("s63_pkcs11",), only_if=(("s63_pkcs11", _needs_softhsm),)),
    Group("tags", ("s48_tags",), args=("--tags", "msvc_t1", "--skip-tags", "msvc_skip")),
    Group("check", ("s49_check_cli",), args=("--check",)),
    Group("diff", ("s50_diff_cli",), args=("--diff",)),
    Group("concurrency", ("s56_concurrency",), env=(("ANSIBLE_FORKS", "10"),),
          checks=(check_sleeps_overlap,), parallel=False),
    Group("free", ("s57_free",), strategies=("free", MITOGEN_FREE), ordered=False,
          checks=(check_free_runs_ahead,), parallel=False),
    Group("host-pinned", ("s62_host_pinned",), strategies=("host_pinned", MITOGEN_HOST_PINNED),
          env=(("ANSIBLE_FORKS", "2"),), ordered=False, checks=(check_hosts_stay_pinned,),
          parallel=False),
    Group("interpreters", ("s58_python38", "s59_python313", "s64_interpreter_discovery",
                           "s65_respawn"),
          smoke=True,
          only_if=(("s58_python38", _needs_py38),)),
)


def _solo(groups: Sequence[Group]) -> List[Group]:
    """Each scenario as its own group, keeping its group's settings (named
    after the scenario, and the group when several groups run it)."""
    out = []
    runs = collections.Counter(stem for g in groups for stem in g.scenarios)
    for g in groups:
        for stem in g.scenarios:
            rc = g.rc if stem == g.scenarios[-1] else 0
            name = stem if runs[stem] == 1 else "%s-%s" % (stem, g.name)
            out.append(dataclasses.replace(g, name=name, scenarios=(stem,), rc=rc,
                                           only_if=tuple(o for o in g.only_if if o[0] == stem)))
    return out


def _params() -> List[Any]:
    groups = _solo(GROUPS) if os.environ.get("MSVC_SCENARIOS_SOLO") else list(GROUPS)
    return [pytest.param(g, id=g.name, marks=[pytest.mark.smoke] if g.smoke else [])
            for g in groups]


# -- environment ------------------------------------------------------------------
def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _pyenv_python(version: str) -> Optional[str]:
    found = sorted(glob.glob("/root/.pyenv/versions/%s.*/bin/python3" % version))
    return found[-1] if found else None


def _card_conf(root: Path, tokens: Path) -> Path:
    conf = root / ("%s.conf" % tokens.name)
    conf.write_text("directories.tokendir = %s\n" % tokens)
    return conf


def _smart_card(root: Path, authorized_keys: Path) -> Optional[Path]:
    """A SoftHSM token store ``root``/tokens holding a new RSA key whose
    public half is appended to ``authorized_keys`` (None without SoftHSM)."""
    if _needs_softhsm() is not None:
        return None
    (root / "tokens").mkdir(parents=True)
    env = dict(os.environ, SOFTHSM2_CONF=str(_card_conf(root, root / "tokens")))
    key = root / "card-key.pem"
    for argv in (["softhsm2-util", "--init-token", "--free", "--label", "msvc-card",
                  "--pin", CARD_PIN, "--so-pin", "so-" + CARD_PIN],
                 ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                  "-out", str(key)],
                 ["softhsm2-util", "--import", str(key), "--token", "msvc-card", "--label",
                  "msvc-login", "--id", "01", "--pin", CARD_PIN]):
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=60)
    key.unlink()
    public = subprocess.run(["ssh-keygen", "-D", SOFTHSM_LIB], env=env, check=True,
                            capture_output=True, text=True, timeout=60).stdout
    with open(authorized_keys, "a") as fp:
        fp.write(public)
    return root / "tokens"


def _card_copy(tokens: Path, tag: str) -> Dict[str, str]:
    """The environment that gives a run its own fresh copy of the card.
    SoftHSM rewrites its token file on every PIN login, right or wrong, and
    a login that reads it while another process writes it fails: the
    vanilla and the mitogen run, which go at the same time, must not share
    one (next to wrong-PIN logins, a right PIN was refused in 2 of 180
    logins on one shared token, in none of 120 on separate copies)."""
    copy = tokens.with_name("tokens-" + tag)
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(tokens, copy)
    return {"SOFTHSM2_CONF": str(_card_conf(tokens.parent, copy))}


def _ini_value(value: str) -> str:
    return "'%s'" % value if " " in value else value


class ScenarioEnv:
    """The AnsibleEnv of the suite plus its data, scratch and fetch dirs."""

    def __init__(self, root: Path, testbed: Any) -> None:
        self.root = root
        h1, h2, h3, h4 = testbed.hosts[:4]
        self.silent = socket.socket()
        self.silent.bind((h2.address, 0))
        self.silent.listen(128)  # accepts TCP into the backlog, never speaks SSH
        silent_port = self.silent.getsockname()[1]
        closed_port = _free_port(h1.address)
        self.wrong_key = root / "wrong_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "msvc-wrong",
                        "-f", str(self.wrong_key)], check=True, capture_output=True, timeout=30)
        # Logins by msvc-bob may use the key on this (software) smart card.
        self.card = _smart_card(root / "softhsm", testbed.authorized_keys_dir / "msvc-bob")
        self.py38 = _pyenv_python("3.8")
        self.py313 = _pyenv_python("3.13")

        def line(name: str, **kv: Any) -> str:
            return " ".join([name] + ["%s=%s" % (k, _ini_value(str(v))) for k, v in kv.items()])

        def conn(host: Any, **over: Any) -> Dict[str, Any]:
            kv = dict(ansible_host=host.address, ansible_port=host.port, ansible_user="root",
                      ansible_ssh_private_key_file=host.key_path,
                      ansible_ssh_common_args=AnsibleEnv.common_args(host),
                      ansible_python_interpreter="/usr/bin/python3")
            kv.update(over)
            return {k: v for k, v in kv.items() if v is not None}

        def pw_login(host: Any, password: str, user: str = "msvc-alice") -> Dict[str, Any]:
            # By password only (no other scenario logs in as that user
            # there: a vanilla ControlMaster would stand in).
            return conn(host, ansible_user=user, ansible_password=password,
                        ansible_ssh_private_key_file=None,
                        ansible_ssh_common_args=AnsibleEnv.common_args(host)
                        + " -o PubkeyAuthentication=no")

        inv = ["[alice]", line("alice1", **conn(h1, ansible_user="msvc-alice"))]
        inv += ["", "[fleet]"]
        inv += [line("fleet%02d" % i, **conn(testbed.hosts[i % 4])) for i in range(1, 11)]
        inv += ["", "[py38]"]
        if self.py38:
            inv.append(line("py38host", **conn(h3, ansible_python_interpreter=self.py38)))
        inv += ["", "[py313]"]
        if self.py313:
            inv.append(line("py313host", **conn(h4, ansible_python_interpreter=self.py313)))
        inv += ["", "[special]",
                line("portfix", **conn(h1, ansible_port=closed_port),
                     msvc_real_port=h1.port, msvc_closed_port=closed_port),
                line("keyfix", **conn(h2, ansible_user="msvc-bob",
                                      ansible_ssh_private_key_file=self.wrong_key),
                     msvc_key=h2.key_path, msvc_wrong_key=self.wrong_key),
                line("argsonly", **conn(h3, ansible_user=None, ansible_ssh_private_key_file=None,
                                        ansible_ssh_common_args=None),
                     msvc_common_args=AnsibleEnv.common_args(h3), msvc_key=h3.key_path),
                line("deadhost", **conn(h1, ansible_port=closed_port)),
                line("pwlogin", **pw_login(h3, "alice-pw")),
                line("badpwlogin", **pw_login(h4, "wrong-pw")),
                line("promptlogin", **pw_login(h1, "bob-pw", "msvc-bob"),
                     ansible_sshpass_prompt="assword"),
                line("otherprompt", **pw_login(h2, "alice-pw"), ansible_sshpass_prompt="Passcode"),
                line("keycontent", **conn(h4, ansible_user="msvc-bob",
                                          ansible_ssh_private_key_file=None),
                     msvc_key=h4.key_path, msvc_wrong_key=self.wrong_key),
                line("silenthost", **conn(h2, ansible_port=silent_port)),
                line("discohost", **conn(h2, ansible_python_interpreter=None))]
        if self.card:
            def card(host: Any, pin: Optional[str]) -> Dict[str, Any]:
                # IdentitiesOnly would hide the card's key from ssh.
                return conn(host, ansible_user="msvc-bob", ansible_password=pin,
                            ansible_ssh_private_key_file=None,
                            ansible_ssh_pkcs11_provider=SOFTHSM_LIB,
                            ansible_ssh_common_args=AnsibleEnv.common_args(host).replace(
                                "-o IdentitiesOnly=yes ", ""))
            inv += [line("cardlogin", **card(h3, CARD_PIN)),
                    line("badcard", **card(h2, "0000-pin")),
                    line("nocard", **card(h4, None))]
        self.ansible = AnsibleEnv(root / "ansible", testbed, "\n".join(inv))

        self.data = root / "data"
        self.data.mkdir()
        rng = random.Random(20240601)
        (self.data / "big.bin").write_bytes(rng.randbytes(2 * 1024 * 1024))
        self._tarball(self.data / "tree.tar.gz")
        # Targets are loopback sshd hosts on this machine: their scratch dir
        # is a local directory every test user may write to (sticky, like
        # /tmp), outside pytest's basetemp, which other pytest sessions
        # reset to 0700.
        self.scratch_base = Path(tempfile.mkdtemp(prefix="msvc-scenarios-"))
        os.chmod(self.scratch_base, 0o711)

    @staticmethod
    def _tarball(path: Path) -> None:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, data in (("tree/", None), ("tree/a.txt", b"archived a\n"),
                               ("tree/sub/", None), ("tree/sub/b.txt", b"archived b\n")):
                info = tarfile.TarInfo(name.rstrip("/"))
                info.mtime = 1700000000
                if data is None:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                else:
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
        with gzip.GzipFile(str(path), "wb", mtime=0) as gz:
            gz.write(raw.getvalue())

    def dirs(self, tag: str) -> Tuple[Path, Path]:
        """(scratch dir on the targets, fetch dir) of the run ``tag``. The
        runs' paths have the same length (a symlink's size is its target's)."""
        name = "run-%08x" % zlib.crc32(tag.encode())
        return self.scratch_base / name, self.root / ("fetched-" + name)

    def reset(self, tag: str) -> None:
        """Fresh scratch and fetch directories before a run."""
        scratch, fetch = self.dirs(tag)
        for d in (scratch, fetch):
            shutil.rmtree(d, ignore_errors=True)
        scratch.mkdir()
        os.chmod(scratch, 0o1777)
        fetch.mkdir()

    def card_env(self, tag: str) -> Dict[str, str]:
        """The environment of the run ``tag``: its own copy of the card."""
        return _card_copy(self.card, tag) if self.card else {}

    def extra_vars(self, tag: str) -> Dict[str, str]:
        scratch, fetch = self.dirs(tag)
        return {"sc_root": str(scratch), "fetch_dir": str(fetch), "data_dir": str(self.data)}

    def placeholders(self, tag: str) -> Dict[str, str]:
        """The run's own directories -> the names all runs share."""
        scratch, fetch = self.dirs(tag)
        return {str(scratch): "<sc_root>", str(fetch): "<fetch_dir>"}

    def close(self) -> None:
        self.silent.close()
        shutil.rmtree(self.scratch_base, ignore_errors=True)


@pytest.fixture(scope="module")
def scenario_env(tmp_path_factory: pytest.TempPathFactory, testbed: Any) -> Iterator[ScenarioEnv]:
    root = tmp_path_factory.mktemp("scenarios")
    (root / "ansible").mkdir()
    env = ScenarioEnv(root, testbed)
    try:
        yield env
    finally:
        env.close()


# -- running and comparing ----------------------------------------------------------
def _describe(run: Run, label: str) -> str:
    return "%s ansible-playbook: rc=%s\n--- stdout (tail) ---\n%s\n--- stderr (tail) ---\n%s" % (
        label, run.rc, run.proc.stdout[-2500:], run.proc.stderr[-1500:])


def _by_scenario(run: Run) -> Dict[str, List[Dict[str, Any]]]:
    out: Dict[str, List[Dict[str, Any]]] = {}
    for e in run.results:
        out.setdefault(scenario_id(e["task"]), []).append(e)
    return out


def _run_group(env: ScenarioEnv, group: Group, books: List[Path], strategy: str, tag: str
               ) -> Tuple[Run, float]:
    """One ansible-playbook run of the group, in its own scratch and fetch
    directories, whose paths are then replaced by shared placeholders."""
    env.reset(tag)
    started = time.monotonic()
    run = run_playbook(env.ansible, books, strategy,
                       "%s.%s" % (group.name, tag), extra_vars=env.extra_vars(tag),
                       timeout=RUN_TIMEOUT, extra_env=dict(env.card_env(tag), **dict(group.env)),
                       args=group.args)
    run.results = substitute(run.results, env.placeholders(tag))
    return run, time.monotonic() - started


def _run_both(env: ScenarioEnv, group: Group, books: List[Path], strategies: Tuple[str, str]
              ) -> List[Tuple[Run, float]]:
    """The vanilla and the mitogen run: at the same time (the machine's
    cores wait on ssh round trips most of the time) unless the group checks
    timing-sensitive behaviour."""
    jobs = [(strategies[0], "vanilla"), (strategies[1], "ours")]
    if not group.parallel:
        return [_run_group(env, group, books, s, t) for s, t in jobs]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_run_group, env, group, books, s, t) for s, t in jobs]
        return [f.result() for f in futures]


#: A race of vanilla's own: ssh refused the login and exited before the
#: pipelined module was written to its stdin (seen under load).
VANILLA_RACE = "Make sure this host can be reached over SSH: [Errno 32] Broken pipe"


def _vanilla_raced(run: Run) -> bool:
    """The vanilla run lost :data:`VANILLA_RACE` somewhere: it is not a
    reference; run it again."""
    return any(VANILLA_RACE in str((e.get("result") or {}).get("msg", ""))
               for e in run.results)


def _vanilla_problems(group: Group, stems: List[str], run: Run) -> List[str]:
    """What makes the vanilla run not behave as the scenarios intend."""
    problems = []
    if run.rc != group.rc:
        problems.append("vanilla rc %s, expected %s" % (run.rc, group.rc))
    got = _by_scenario(run)
    wanted = {s.split("_")[0] for s in stems}
    for sid in sorted(wanted - set(got)):
        problems.append("vanilla produced no result for scenario %s" % sid)
    for sid in sorted(set(got) - wanted):
        names = sorted({e["task"] for e in got[sid]})
        problems.append("results outside the group's scenarios (task names must start "
                        "with sNN): %s" % names[:5])
    for e in run.results:
        if e["action"] in ("assert", "ansible.builtin.assert") and e["status"] == "failed":
            problems.append("vanilla assertion failed: %s on %s: %s" % (
                e["task"], e["host"], e["result"].get("msg")))
    for check in group.checks:
        problems.extend(check(run))
    return problems


#: Deliberate differences, documented in docs/ansible.md ("Differences from
#: vanilla"): modules always travel pipelined, so no temporary file needs
#: world-readable permissions and vanilla's warning about them has no cause.
WORLD_READABLE = "Using world-readable permissions for temporary files"


def _expected_differences(sid: str, entries: List[Dict[str, Any]]
                          ) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Vanilla's entries of scenario ``sid`` without what is expected to
    differ, and problems if what is expected is not there any more."""
    if sid != "s37":
        return entries, []
    out, seen = [], False
    for entry in entries:
        result = dict(entry.get("result") or {})
        warnings = result.get("warnings")
        if isinstance(warnings, list) and any(WORLD_READABLE in str(w) for w in warnings):
            seen = True
            kept = [w for w in warnings if WORLD_READABLE not in str(w)]
            if kept:
                result["warnings"] = kept
            else:
                del result["warnings"]
            entry = dict(entry, result=result)
        out.append(entry)
    if not seen:
        return entries, ["s37: vanilla gave no world-readable warning any more: "
                         "drop this expected difference"]
    return out, []


def _divergences(group: Group, stems: List[str], ours_label: str, vanilla: Run, ours: Run
                 ) -> Tuple[List[str], Dict[str, str]]:
    """(problems, scenario id -> "same"/"diverges"/"not reached")."""
    labels = ("vanilla", ours_label)
    problems = []
    verdict: Dict[str, str] = {}
    if vanilla.rc != ours.rc:
        problems.append("ansible-playbook rc: vanilla %s, %s %s" % (vanilla.rc, ours_label, ours.rc))
    if vanilla.stats != ours.stats:
        hosts = sorted(set(vanilla.stats or {}) | set(ours.stats or {}))
        rows = ["  %-11s vanilla %s\n  %-11s %-7s %s" % (
            h, (vanilla.stats or {}).get(h), "", ours_label, (ours.stats or {}).get(h))
            for h in hosts if (vanilla.stats or {}).get(h) != (ours.stats or {}).get(h)]
        if len(rows) > 2 * SHOW_HOSTS:
            rows[2 * SHOW_HOSTS:] = ["  ... and %d more hosts" % (len(rows) - 2 * SHOW_HOSTS)]
        problems.append("play recap differs:\n" + "\n".join(rows))
    va, ou = _by_scenario(vanilla), _by_scenario(ours)
    for stem in stems:
        sid = stem.split("_")[0]
        a, b = va.get(sid, []), ou.get(sid, [])
        if not b:
            verdict[sid] = "not reached"
            problems.append("%s: no %s results (an earlier failure stopped the run?)"
                            % (stem, ours_label))
            continue
        a, found = _expected_differences(sid, a)
        ha, hb = per_host(a), per_host(b)
        differing = []
        for host in sorted(set(ha) | set(hb)):
            diff = first_difference(ha.get(host, []), hb.get(host, []), labels)
            if diff:
                differing.append(host)
                if len(differing) <= SHOW_HOSTS:
                    found.append("%s, host %s, %s" % (stem, host, diff))
        if len(differing) > SHOW_HOSTS:
            found.append("%s: %d more hosts differ: %s" % (
                stem, len(differing) - SHOW_HOSTS, " ".join(differing[SHOW_HOSTS:])))
        if group.ordered and not found and task_order(a) != task_order(b):
            order_a, order_b = task_order(a), task_order(b)
            i = next((i for i, (x, y) in enumerate(zip(order_a, order_b)) if x != y),
                     min(len(order_a), len(order_b)))
            found.append("%s: task order differs at step %d: vanilla %s, %s %s" % (
                stem, i + 1, order_a[i:i + 2], ours_label, order_b[i:i + 2]))
        verdict[sid] = "diverges" if found else "same"
        problems.extend(found)
    for check in group.checks:
        problems.extend("%s: %s" % (ours_label, p) for p in check(ours))
    return problems, verdict


@pytest.mark.parametrize("group", _params())
def test_scenario_group(group: Group, scenario_env: ScenarioEnv, testbed: Any) -> None:
    stems = []
    for stem in group.scenarios:
        gate = dict(group.only_if).get(stem)
        reason = gate() if gate else None
        if reason is None:
            stems.append(stem)
    if "s58_python38" in stems and not scenario_env.py38:
        pytest.skip("no /root/.pyenv/versions/3.8*/bin/python3 on this machine")
    if {"s59_python313", "s65_respawn"} & set(stems) and not scenario_env.py313:
        pytest.skip("no /root/.pyenv/versions/3.13*/bin/python3 on this machine")
    if not stems:
        pytest.skip("no scenario of this group applies to ansible-core %s" % (ansible_version(),))
    books = [SCENARIOS / ("%s.yml" % s) for s in stems]
    vanilla_strategy, ours_strategy = group.strategies
    if os.environ.get("MSVC_SCENARIOS_VANILLA_TWICE"):
        ours_strategy = vanilla_strategy
    ours_label = "mitogen" if ours_strategy != vanilla_strategy else "vanilla#2"

    (vanilla, t_vanilla), (ours, t_ours) = _run_both(scenario_env, group, books,
                                                     (vanilla_strategy, ours_strategy))
    if _vanilla_raced(vanilla):
        vanilla, t_vanilla = _run_group(scenario_env, group, books, vanilla_strategy, "vanilla")
    problems = _vanilla_problems(group, stems, vanilla)
    if problems:
        pytest.fail("the vanilla run does not behave as the scenarios intend:\n%s\n\n%s" % (
            "\n".join(problems), _describe(vanilla, "vanilla")), pytrace=False)
    keep = os.environ.get("MSVC_SCENARIOS_KEEP")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for f in scenario_env.ansible.root.glob("*.%s.*.jsonl" % group.name):
            shutil.copy(f, keep)
    problems, verdict = _divergences(group, stems, ours_label, vanilla, ours)
    summary = "group %s (%s %.1fs, %s %.1fs): %s" % (
        group.name, vanilla_strategy, t_vanilla, ours_strategy, t_ours,
        ", ".join("%s %s" % kv for kv in sorted(verdict.items())))
    print(summary)
    if problems:
        pytest.fail("%s\n\n%s\n\n%s" % (summary, "\n\n".join(problems),
                                         _describe(ours, ours_label)), pytrace=False)


def test_every_scenario_is_grouped() -> None:
    """Every scenario playbook belongs to a group (a scenario in several
    groups runs with other settings in each), and there are at least 40."""
    files = sorted(p.stem for p in SCENARIOS.glob("s[0-9][0-9]_*.yml"))
    grouped = [s for g in GROUPS for s in g.scenarios]
    assert sorted(set(grouped)) == files
    for stem in set(grouped):
        settings = [(g.env, g.args, g.strategies) for g in GROUPS if stem in g.scenarios]
        assert len(set(settings)) == len(settings), "%s runs twice alike" % stem
    assert len(set(s.split("_")[0] for s in files)) == len(files)
    assert len(files) >= 40
