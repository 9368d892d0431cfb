"""Local multi-host SSH testbed for the mitogen.svc test suite.

Test-only, controller side: nothing in here is shipped to targets or imported
by the collection itself.  It needs root (it creates local users, writes
``/etc/sudoers.d/msvc-testbed`` and ``/etc/doas.conf`` and runs ``sshd``).

What it provides:

* :func:`ensure_users` idempotently creates the local test users
  ``msvc-alice`` (may ``sudo``/``doas`` with her password) and ``msvc-bob``
  (no privileges).
* :class:`Testbed` starts ``count`` independent OpenSSH servers, host ``i``
  listening on ``127.0.1.(10+i)`` on a free port, each with its own host key,
  plus one client key and a ``known_hosts`` file so that
  :meth:`SshdHost.ssh_argv` gives a fully non-interactive ``ssh`` command.

Each sshd runs under a tiny supervisor (this file run with ``--supervise``)
that is a child subreaper: processes that daemonise from an ssh session stay
in its subtree, get reaped, and are killed by :meth:`SshdHost.stop`.

The sshd configs set ``SetEnv SHLVL=1``: bash increments that to 2 at start,
and bash only sources ``~/.bashrc`` for ssh-launched ``bash -c`` commands when
its shell level is below 2.  This keeps root's slow ``pyenv init`` out of
every remote command.

Typical use::

    ok, reason = Testbed.available()
    if not ok:
        pytest.skip(reason)
    with Testbed(tmp_path, count=2) as tb:
        argv = tb.hosts[0].ssh_argv("msvc-alice") + ["id -un"]
        subprocess.run(argv, check=True)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Iterator, Sequence

__all__ = [
    "ALICE",
    "ALICE_PASSWORD",
    "BOB",
    "BOB_PASSWORD",
    "DOAS_CONF_PATH",
    "SSHD_PATH",
    "SUDOERS_PATH",
    "SshdHost",
    "Testbed",
    "TestbedError",
    "TestbedUsers",
    "UserAccount",
    "ensure_users",
]

ALICE = "msvc-alice"
ALICE_PASSWORD = "alice-pw"
BOB = "msvc-bob"
BOB_PASSWORD = "bob-pw"

SSHD_PATH = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
SUDOERS_PATH = Path("/etc/sudoers.d/msvc-testbed")
DOAS_CONF_PATH = Path("/etc/doas.conf")
DOAS_BLOCK_BEGIN = "# BEGIN msvc-testbed (managed by tests/lib/testbed.py)"
DOAS_BLOCK_END = "# END msvc-testbed"
LOCK_PATH = Path("/run/lock/msvc-testbed.lock")

#: Host ``i`` (1-based) listens on ``127.0.1.(HOST_OCTET_BASE + i)``.
HOST_OCTET_BASE = 10
MAX_HOSTS = 200
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0

# Characters that would need quoting (or trigger %-token expansion) inside
# sshd_config / ssh -o values.  Workdirs containing them are rejected.
_UNSAFE_PATH_CHARS = frozenset(" \t\n\"'%#\\")


class TestbedError(RuntimeError):
    """Test-only, controller side: the testbed could not be set up or run."""

    __test__ = False


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = COMMAND_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a local helper command, capturing text output (bounded)."""
    proc = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise TestbedError(
            f"command {list(argv)!r} failed with {proc.returncode}: "
            f"stdout={proc.stdout.strip()!r} stderr={proc.stderr.strip()!r}"
        )
    return proc


def _write_file_atomic(path: Path, data: str, mode: int) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as fp:
            fp.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _global_lock(timeout: float = 60.0) -> Iterator[None]:
    """Serialise user/sudoers/doas edits across concurrent test processes."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TestbedError(f"timed out waiting for {LOCK_PATH}")
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # also releases the flock


def _check_path_safe(path: Path) -> None:
    bad = sorted(_UNSAFE_PATH_CHARS.intersection(str(path)))
    if bad:
        raise ValueError(
            f"testbed workdir {str(path)!r} contains characters {bad!r} "
            "that cannot be used unquoted in sshd_config"
        )


def _ensure_traversable(path: Path) -> None:
    """Make ``path`` and its ancestors searchable (``o+x``) by everyone.

    sshd opens ``AuthorizedKeysFile`` with the *target user's* privileges, so
    msvc-alice/msvc-bob must be able to traverse into the workdir.  pytest's
    ``/tmp/pytest-of-root`` is mode 0700; only the search bit is added (no
    read bit), so directory listings stay private.
    """
    for directory in (path, *path.parents):
        st = directory.stat()
        if not st.st_mode & stat.S_IXOTH:
            os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _free_port(address: str) -> int:
    """Ask the kernel for a currently unused TCP port on ``address``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """Return ``(ppid, state, starttime)`` of ``pid`` or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fp:
            raw = fp.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOENT):
            return None
        raise
    # "pid (comm) state ppid ..." -- comm may contain spaces and parens.
    rest = raw[raw.rindex(")") + 2 :].split()
    return int(rest[1]), rest[0], int(rest[19])


def _alive(pid: int, starttime: int) -> bool:
    """True if ``pid`` is still the same, non-zombie process."""
    info = _proc_stat(pid)
    return info is not None and info[2] == starttime and info[1] not in "ZX"


def _descendants(root_pid: int) -> list[tuple[int, int]]:
    """All live descendants of ``root_pid`` as ``(pid, starttime)`` pairs."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        info = _proc_stat(int(entry))
        if info is None or info[1] in "ZX":
            continue
        children.setdefault(info[0], []).append((int(entry), info[2]))
    result: list[tuple[int, int]] = []
    todo = [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            result.append(child)
            todo.append(child[0])
    return result


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# ---------------------------------------------------------------------------
# Users, sudo, doas
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UserAccount:
    """Test-only, controller side: one local test user and its password."""

    name: str
    password: str
    can_sudo: bool


@dataclasses.dataclass(frozen=True)
class TestbedUsers:
    """Test-only, controller side: the accounts set up by :func:`ensure_users`."""

    __test__ = False

    alice: UserAccount
    bob: UserAccount
    sudoers_path: Path
    doas_conf_path: Path

    @property
    def all(self) -> tuple[UserAccount, ...]:
        return (self.alice, self.bob)


TESTBED_USERS = TestbedUsers(
    alice=UserAccount(ALICE, ALICE_PASSWORD, can_sudo=True),
    bob=UserAccount(BOB, BOB_PASSWORD, can_sudo=False),
    sudoers_path=SUDOERS_PATH,
    doas_conf_path=DOAS_CONF_PATH,
)

_SUDOERS_CONTENT = (
    "# Managed by mitogen.svc tests/lib/testbed.py -- test machines only.\n"
    f"{ALICE} ALL=(ALL:ALL) ALL\n"
)

_DOAS_BLOCK = (
    f"{DOAS_BLOCK_BEGIN}\n"
    "# msvc-alice may run anything as any user, with her password.\n"
    f"permit {ALICE}\n"
    f"{DOAS_BLOCK_END}\n"
)


def _ensure_user(account: UserAccount) -> None:
    try:
        entry = pwd.getpwnam(account.name)
    except KeyError:
        _run(["useradd", "--create-home", "--user-group",
              "--shell", "/bin/bash", account.name])
        entry = pwd.getpwnam(account.name)
    if entry.pw_shell != "/bin/bash":
        _run(["usermod", "--shell", "/bin/bash", account.name])
    home = Path(entry.pw_dir)
    if not home.is_dir():
        home.mkdir(mode=0o755, parents=True)
        os.chown(home, entry.pw_uid, entry.pw_gid)
    if not account.can_sudo:
        # Never let a leftover group membership grant privileges.
        for group in ("sudo", "wheel", "admin"):
            try:
                members = grp.getgrnam(group).gr_mem
            except KeyError:
                continue
            if account.name in members:
                _run(["gpasswd", "--delete", account.name, group])


def _ensure_sudoers() -> None:
    if SUDOERS_PATH.exists() and SUDOERS_PATH.read_text() == _SUDOERS_CONTENT:
        return
    SUDOERS_PATH.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    # A '.' in the name makes sudo's @includedir ignore the temp file.
    tmp = SUDOERS_PATH.with_name(f".{SUDOERS_PATH.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(_SUDOERS_CONTENT)
        os.chmod(tmp, 0o440)
        _run(["visudo", "-cf", str(tmp)])
        os.replace(tmp, SUDOERS_PATH)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _strip_doas_block(text: str) -> str:
    out: list[str] = []
    skipping = False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped == DOAS_BLOCK_BEGIN:
            skipping = True
            continue
        if skipping:
            if stripped == DOAS_BLOCK_END:
                skipping = False
            continue
        out.append(line)
    return "".join(out)


def _ensure_doas_conf() -> None:
    try:
        old = DOAS_CONF_PATH.read_text()
        mode = stat.S_IMODE(DOAS_CONF_PATH.stat().st_mode)
    except FileNotFoundError:
        old, mode = "", 0o600
    base = _strip_doas_block(old)
    if base and not base.endswith("\n"):
        base += "\n"  # doas.conf's parser requires a final newline
    new = base + _DOAS_BLOCK
    if new == old:
        return
    # doas refuses configs writable by group/other.
    mode &= ~(stat.S_IWGRP | stat.S_IWOTH)
    tmp = DOAS_CONF_PATH.with_name(f".{DOAS_CONF_PATH.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as fp:
            fp.write(new)
        os.chmod(tmp, mode)
        doas = shutil.which("doas")
        if doas is not None:
            _run([doas, "-C", str(tmp)])
        os.replace(tmp, DOAS_CONF_PATH)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def ensure_users() -> TestbedUsers:
    """Idempotently create the local test users and their privileges.

    Test-only, controller side; needs root.  Creates ``msvc-alice``
    (password ``alice-pw``, ``sudo`` and ``doas`` as any user with her
    password) and ``msvc-bob`` (password ``bob-pw``, no privileges), both with
    home directories and ``/bin/bash``.  The sudo rule lives in
    ``/etc/sudoers.d/msvc-testbed`` (checked with ``visudo -cf``); the doas
    rule is a marked block appended to ``/etc/doas.conf`` (other content of an
    existing file is preserved).  Safe to call concurrently from several
    processes.
    """
    if os.geteuid() != 0:
        raise PermissionError("ensure_users() must run as root")
    with _global_lock():
        for account in TESTBED_USERS.all:
            _ensure_user(account)
        _run(
            ["chpasswd"],
            input="".join(f"{a.name}:{a.password}\n" for a in TESTBED_USERS.all),
        )
        _ensure_sudoers()
        _ensure_doas_conf()
    return TESTBED_USERS


# ---------------------------------------------------------------------------
# sshd hosts
# ---------------------------------------------------------------------------

_sshd_option_cache: dict[str, bool] = {}


def _sshd_supports(config: Path, option: str) -> bool:
    """True if this sshd accepts ``option`` (``Name=value``) with ``config``."""
    key = option.split("=", 1)[0].lower()
    if key not in _sshd_option_cache:
        proc = _run([SSHD_PATH, "-t", "-f", str(config), "-o", option],
                    check=False)
        _sshd_option_cache[key] = proc.returncode == 0
    return _sshd_option_cache[key]


class SshdHost:
    """Test-only, controller side: one sshd instance of a :class:`Testbed`.

    Attributes ``address``, ``port``, ``key_path`` (client private key),
    ``known_hosts_path`` and ``host_key_pub`` (``"ssh-ed25519 AAAA..."``) are
    valid once the owning testbed has been started; ``port`` stays fixed across
    stop()/start() of the same object.
    """

    def __init__(
        self,
        *,
        index: int,
        address: str,
        directory: Path,
        key_path: Path,
        known_hosts_path: Path,
        authorized_keys_dir: Path,
    ) -> None:
        self.index = index
        self.name = f"host{index}"
        self.address = address
        self.port = 0
        self.directory = directory
        self.key_path = key_path
        self.known_hosts_path = known_hosts_path
        self.authorized_keys_dir = authorized_keys_dir
        self.host_key_path = directory / "ssh_host_ed25519_key"
        self.host_key_pub = ""
        self.config_path = directory / "sshd_config"
        self.pid_path = directory / "sshd.pid"
        self.log_path = directory / "sshd.log"
        self.extra_options: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SshdHost {self.name} {self.address}:{self.port} {state}>"

    # -- setup -------------------------------------------------------------

    def prepare(self) -> None:
        """Create the host key (once), pick a port (once), write sshd_config."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # sshd (even "sshd -t") insists on its privilege separation dir.
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        if not self.host_key_path.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                  "-C", f"msvc-testbed-{self.name}",
                  "-f", str(self.host_key_path)])
        pub = self.host_key_path.with_name(self.host_key_path.name + ".pub")
        self.host_key_pub = " ".join(pub.read_text().split()[:2])
        if not self.port:
            self.port = _free_port(self.address)
        self.config_path.write_text(self._render_config(self.extra_options))
        # Options only newer sshd versions know; never emit unsupported ones.
        optional = ["PerSourcePenalties=no"]
        wanted = [o for o in optional if _sshd_supports(self.config_path, o)]
        if wanted != self.extra_options:
            self.extra_options = wanted
            self.config_path.write_text(self._render_config(wanted))
        _run([SSHD_PATH, "-t", "-f", str(self.config_path)])

    def _render_config(self, extra: Sequence[str]) -> str:
        lines = [
            f"# mitogen.svc testbed {self.name} -- generated, do not edit",
            f"ListenAddress {self.address}:{self.port}",
            f"HostKey {self.host_key_path}",
            f"PidFile {self.pid_path}",
            f"AuthorizedKeysFile {self.authorized_keys_dir}/%u",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # bash adds one; at SHLVL>=2 it skips ~/.bashrc for ssh commands.
            "SetEnv SHLVL=1",
            "MaxStartups 200",
            "MaxSessions 200",
            "LogLevel ERROR",
            "PrintMotd no",
            "UseDNS no",
            "Subsystem sftp internal-sftp",
        ]
        lines += [" ".join(o.split("=", 1)) for o in extra]
        return "\n".join(lines) + "\n"

    def known_hosts_line(self) -> str:
        """The ``known_hosts`` entry for this host (needs :meth:`prepare`)."""
        return f"[{self.address}]:{self.port} {self.host_key_pub}"

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the supervisor process (the listener sshd is its child)."""
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start sshd (``prepare()`` must have run) and wait until it serves."""
        if self.running:
            return
        if not self.port or not self.host_key_pub:
            raise TestbedError(f"{self.name}: prepare() was not called")
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()  # stale; its reappearance means "ready"
        grace = f"{STOP_TIMEOUT / 2:.3f}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).resolve()),
                 _SUPERVISOR_ARG, grace,
                 SSHD_PATH, "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                close_fds=True,
                start_new_session=True,
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait (bounded) until sshd listens.

        sshd writes its PidFile only after its listening socket is bound, so
        the file appearing is the readiness signal.  (Probing the port instead
        would leave "Connection closed" noise in the sshd log.)
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise TestbedError(
                    f"{self.name}: sshd exited early "
                    f"(rc={self.proc.returncode if self.proc else None}); "
                    f"log: {self.log_tail()!r}"
                )
            with contextlib.suppress(FileNotFoundError, ValueError):
                if int(self.pid_path.read_text()) > 0:
                    return
            time.sleep(0.01)
        raise TestbedError(
            f"{self.name}: sshd not ready on {self.address}:{self.port} after "
            f"{timeout}s; log: {self.log_tail()!r}"
        )

    def process_tree(self) -> list[int]:
        """PIDs of the supervisor, the listener sshd and all live descendants.

        Thanks to the subreaper supervisor this includes processes that
        daemonised themselves (double fork / setsid) from an ssh session.
        """
        if not self.running:
            return []
        assert self.proc is not None
        return [self.proc.pid] + [pid for pid, _ in _descendants(self.proc.pid)]

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop sshd and every process it spawned (sessions, user commands).

        SIGTERM to the supervisor, which SIGTERMs its whole subtree, SIGKILLs
        leftovers after ``timeout / 2`` and exits once everything is reaped.
        If it does not exit within ``timeout``, the subtree is SIGKILLed from
        here.  Idempotent.
        """
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                victims = _descendants(proc.pid)
                proc.kill()
                for pid, start in victims:
                    if _alive(pid, start):
                        _signal(pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()
        self.proc = None

    # -- client side -------------------------------------------------------

    def ssh_options(self) -> list[str]:
        """``ssh`` options (no port/destination) for non-interactive use."""
        return [
            "-i", str(self.key_path),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts_path}",
            "-o", "ControlMaster=no",
            "-o", "LogLevel=ERROR",
        ]

    def ssh_argv(
        self, user: str = "root", *, via: tuple[str, int] | None = None
    ) -> list[str]:
        """OpenSSH client argv prefix reaching this host as ``user``.

        The caller appends the remote command.  ``via=(addr, port)`` connects
        to that address instead (e.g. a :class:`LatencyProxy` in front of this
        host) while still verifying this host's key (``HostKeyAlias``).
        """
        if not self.port:
            raise TestbedError(f"{self.name}: testbed not started")
        if via is None:
            return ["ssh", "-p", str(self.port), *self.ssh_options(),
                    f"{user}@{self.address}"]
        return ["ssh", "-p", str(via[1]), *self.ssh_options(),
                "-o", f"HostKeyAlias=[{self.address}]:{self.port}",
                f"{user}@{via[0]}"]

    def ssh_run(
        self,
        command: str,
        user: str = "root",
        *,
        input: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
        via: tuple[str, int] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on this host over ssh; never raises on exit code."""
        return subprocess.run(
            self.ssh_argv(user, via=via) + [command],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""


class Testbed:
    """Test-only, controller side: ``count`` local sshd hosts with shared keys.

    Layout under ``workdir``::

        client/id_ed25519[.pub]      client key used by ssh_argv()
        client/known_hosts           every host's key, "[addr]:port ssh-ed25519 ..."
        authorized_keys/<user>       client public key for root/alice/bob
        hosts/hostN/                 host key, sshd_config, sshd.pid, sshd.log

    ``start()`` also runs :func:`ensure_users`, makes ``workdir`` and its
    parents searchable (``o+x``) for the test users, and starts the hosts in
    parallel.  Usable as a context manager; ``stop()`` is idempotent.
    """

    __test__ = False

    def __init__(self, workdir: Path, count: int = 4) -> None:
        if not 1 <= count <= MAX_HOSTS:
            raise ValueError(f"count must be in 1..{MAX_HOSTS}, got {count}")
        self.workdir = Path(workdir).absolute()
        _check_path_safe(self.workdir)
        self.count = count
        self.client_dir = self.workdir / "client"
        self.key_path = self.client_dir / "id_ed25519"
        self.known_hosts_path = self.client_dir / "known_hosts"
        self.authorized_keys_dir = self.workdir / "authorized_keys"
        self.users: TestbedUsers = TESTBED_USERS
        self.hosts: list[SshdHost] = [
            SshdHost(
                index=i,
                address=f"127.0.1.{HOST_OCTET_BASE + i}",
                directory=self.workdir / "hosts" / f"host{i}",
                key_path=self.key_path,
                known_hosts_path=self.known_hosts_path,
                authorized_keys_dir=self.authorized_keys_dir,
            )
            for i in range(1, count + 1)
        ]

    def __repr__(self) -> str:
        return f"<Testbed {self.workdir} hosts={self.hosts!r}>"

    def __enter__(self) -> Testbed:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __iter__(self) -> Iterator[SshdHost]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, index: int) -> SshdHost:
        return self.hosts[index]

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether a testbed can run here: ``(True, "")`` or ``(False, why)``."""
        if not hasattr(os, "geteuid") or not Path("/proc/self/stat").exists():
            return False, "testbed needs Linux (/proc)"
        if os.geteuid() != 0:
            return False, "testbed needs root (creates users, runs sshd)"
        if not os.access(SSHD_PATH, os.X_OK):
            return False, f"{SSHD_PATH} not installed (apt-get install openssh-server)"
        for tool in ("ssh", "ssh-keygen", "useradd", "chpasswd", "visudo"):
            if shutil.which(tool) is None:
                return False, f"{tool!r} not found in PATH"
        try:
            _free_port(f"127.0.1.{HOST_OCTET_BASE + 1}")
        except OSError as exc:
            return False, f"cannot bind 127.0.1.x loopback addresses: {exc}"
        return True, ""

    @property
    def running(self) -> bool:
        return any(h.running for h in self.hosts)

    def prepare(self) -> None:
        """Create users, keys, authorized_keys, configs and known_hosts."""
        self.users = ensure_users()
        for directory in (self.workdir, self.client_dir,
                          self.authorized_keys_dir):
            directory.mkdir(parents=True, exist_ok=True)
        _ensure_traversable(self.authorized_keys_dir)
        self.client_dir.chmod(0o700)
        if not self.key_path.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                  "-C", "msvc-testbed-client", "-f", str(self.key_path)])
        pub = self.key_path.with_name(self.key_path.name + ".pub").read_text()
        for user in ("root", *(a.name for a in self.users.all)):
            # Read by sshd with the target user's uid: world-readable.
            _write_file_atomic(self.authorized_keys_dir / user, pub, 0o644)
        with concurrent.futures.ThreadPoolExecutor(self.count) as pool:
            list(pool.map(SshdHost.prepare, self.hosts))
        _write_file_atomic(
            self.known_hosts_path,
            "".join(h.known_hosts_line() + "\n" for h in self.hosts),
            0o644,
        )

    def start(self, timeout: float = READY_TIMEOUT) -> Testbed:
        """Prepare and start all hosts in parallel; stop all on any failure."""
        ok, reason = self.available()
        if not ok:
            raise TestbedError(reason)
        try:
            self.prepare()
            with concurrent.futures.ThreadPoolExecutor(self.count) as pool:
                futures = [pool.submit(h.start, timeout) for h in self.hosts]
                for future in futures:
                    future.result()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop all hosts in parallel (bounded); idempotent."""
        with concurrent.futures.ThreadPoolExecutor(self.count) as pool:
            futures = [pool.submit(h.stop, timeout) for h in self.hosts]
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error


# ---------------------------------------------------------------------------
# Per-host supervisor ("python3 -I testbed.py --supervise GRACE sshd ...")
# ---------------------------------------------------------------------------

_SUPERVISOR_ARG = "--supervise"
_PR_SET_CHILD_SUBREAPER = 36


def _set_child_subreaper() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def _supervise(grace: float, command: list[str]) -> int:
    """Run ``command`` as a child subreaper; return its exit code.

    Test-only, controller side.  Why: sshd's per-connection processes call
    setsid() and some of their children outlive their parents; orphans are
    reparented to the nearest subreaper.  Without this supervisor they go to
    PID 1, which in minimal VMs/containers may never reap them (zombies pile
    up) and which makes them impossible to find at stop().  The supervisor
    reaps every orphan, and on SIGTERM/SIGINT/SIGHUP, when sshd exits, or when
    its own parent dies, it SIGTERMs its whole subtree, SIGKILLs what is left
    after ``grace`` seconds and exits once no child remains (bounded).
    """
    parent = os.getppid()
    _set_child_subreaper()
    wanted = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    main_pid = os.fork()
    if main_pid == 0:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.execv(command[0], command)
        finally:
            os._exit(127)
    main_status: int | None = None
    term_deadline: float | None = None
    signalled: set[tuple[int, int]] = set()
    me = os.getpid()

    def reap() -> bool:
        """Reap all exited children; True when no child is left."""
        nonlocal main_status
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                return False
            if pid == main_pid:
                main_status = os.waitstatus_to_exitcode(status)

    while True:
        info = signal.sigtimedwait(wanted, 0.2)
        if reap():
            break
        now = time.monotonic()
        if term_deadline is None:
            if (
                (info is not None and info.si_signo != signal.SIGCHLD)
                or main_status is not None
                or os.getppid() != parent
            ):
                term_deadline = now + grace
        if term_deadline is None:
            continue
        if now < term_deadline:
            for victim in _descendants(me):
                if victim not in signalled:
                    signalled.add(victim)
                    _signal(victim[0], signal.SIGTERM)
        elif now < term_deadline + 2.0:
            for pid, _ in _descendants(me):
                _signal(pid, signal.SIGKILL)
        else:
            print(f"supervisor: giving up on {_descendants(me)}", file=sys.stderr)
            break
    if main_status is None:
        return 0
    return main_status if main_status >= 0 else 128 - main_status


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == _SUPERVISOR_ARG:
        sys.exit(_supervise(float(sys.argv[2]), sys.argv[3:]))
    sys.exit(f"usage: {sys.argv[0]} {_SUPERVISOR_ARG} GRACE COMMAND...")
