"""Tests of the test infrastructure: tests/lib/testbed.py and latency_proxy.py.

Test-only, controller side.  The sshd tests need root and /usr/sbin/sshd and
are skipped (with the reason from ``Testbed.available()``) otherwise; the
latency proxy tests run anywhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import selectors
import socket
import socketserver
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Iterator

import pytest

from tests.lib import testbed as tbmod
from tests.lib.latency_proxy import LatencyProxy
from tests.lib.testbed import ALICE, ALICE_PASSWORD, BOB, BOB_PASSWORD, Testbed

if importlib.util.find_spec("pytest_timeout") is not None:
    pytestmark = [pytest.mark.timeout(60)]

TESTBED_OK, TESTBED_REASON = Testbed.available()
needs_testbed = pytest.mark.skipif(not TESTBED_OK, reason=TESTBED_REASON)

REMOTE_PROBE = 'echo $SHLVL; id -un; /usr/bin/python3 -c "print(1)"'


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


class _EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True
    request_queue_size = 256


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.socket.getsockname()[:2]
        yield str(host), int(port)
    finally:
        server.shutdown()
        server.server_close()  # joins handler threads (block_on_close)
        thread.join(5)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        data = sock.recv(min(size, 1 << 20))
        if not data:
            raise EOFError("connection closed early")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def _readline(stream: IO[bytes], timeout: float) -> bytes:
    """Read one line from a pipe with a deadline (returns partial on EOF)."""
    fd = stream.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                raise TimeoutError(f"no line within {timeout}s (got {buf!r})")
            data = os.read(fd, 1)
            if not data:
                return buf
            buf += data
    return buf


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# latency proxy (no root needed)
# ---------------------------------------------------------------------------


def test_proxy_round_trip_and_order(echo_server: tuple[str, int]) -> None:
    delay = 0.02
    with LatencyProxy(target=echo_server, delay=delay) as proxy:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            rtts = []
            for i in range(5):
                msg = f"ping {i}\n".encode()
                t0 = time.monotonic()
                sock.sendall(msg)
                assert _recv_exactly(sock, len(msg)) == msg
                rtts.append(time.monotonic() - t0)
    assert min(rtts) >= 2 * delay
    assert statistics.median(rtts) < 2 * delay + 0.1


def test_proxy_throughput_not_serialised(echo_server: tuple[str, int]) -> None:
    """8 MiB echoed through a 50 ms proxy: timestamp scheduling, not sleeps."""
    delay = 0.05
    payload = os.urandom(8 << 20)
    received = bytearray()
    with LatencyProxy(target=echo_server, delay=delay) as proxy:
        with socket.create_connection(proxy.address, timeout=10) as sock:

            def send() -> None:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)  # half-close travels too

            sender = threading.Thread(target=send)
            t0 = time.monotonic()
            sender.start()
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    break
                received += data
            elapsed = time.monotonic() - t0
            sender.join(10)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    # A serial sleep(delay) per chunk would need well over 3 s here.
    assert 2 * delay <= elapsed < 3.0, elapsed
    assert proxy.stats.bytes_upstream == len(payload)
    assert proxy.stats.bytes_downstream == len(payload)


def test_proxy_many_concurrent_connections(echo_server: tuple[str, int]) -> None:
    delay = 0.05
    clients = 60
    results: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients)

    def client(proxy_addr: tuple[str, int], n: int) -> None:
        try:
            with socket.create_connection(proxy_addr, timeout=10) as sock:
                msg = f"client {n} ".encode() * 100
                barrier.wait(10)
                t0 = time.monotonic()
                sock.sendall(msg)
                assert _recv_exactly(sock, len(msg)) == msg
                results.append(time.monotonic() - t0)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with LatencyProxy(target=echo_server, delay=delay) as proxy:
        threads = [threading.Thread(target=client, args=(proxy.address, n))
                   for n in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        elapsed = time.monotonic() - t0
        assert proxy.stats.connections_total == clients
    assert not errors, errors[:3]
    assert len(results) == clients
    assert min(results) >= 2 * delay
    # Serialised handling would take clients * 2 * delay = 6 s.
    assert elapsed < 2.0, elapsed


def test_proxy_stop_leaks_nothing(echo_server: tuple[str, int]) -> None:
    time.sleep(0.05)
    threads_before = threading.active_count()
    fds_before = _open_fds()
    proxy = LatencyProxy(target=echo_server, delay=0.01).start()
    # Leave one connection open across stop(): stop() must abort it.
    idle = socket.create_connection(proxy.address, timeout=5)
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(b"x")
        assert _recv_exactly(sock, 1) == b"x"
    proxy.stop()
    assert not proxy.running
    assert idle.recv(10) == b""  # closed by the proxy
    idle.close()
    proxy.stop()  # idempotent
    with pytest.raises(RuntimeError):
        proxy.address
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
        threading.active_count() != threads_before or _open_fds() != fds_before
    ):
        time.sleep(0.02)  # echo handler threads wind down
    assert threading.active_count() == threads_before
    assert _open_fds() == fds_before


def test_proxy_unreachable_target_closes_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with LatencyProxy(target=("127.0.0.1", dead_port), delay=0.0) as proxy:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.settimeout(5)
            try:
                assert sock.recv(10) == b""
            except ConnectionResetError:
                pass
        assert proxy.stats.connect_failures == 1


def test_proxy_rejects_negative_delay() -> None:
    with pytest.raises(ValueError):
        LatencyProxy(target=("127.0.0.1", 1), delay=-1)


# ---------------------------------------------------------------------------
# pure helpers of testbed.py
# ---------------------------------------------------------------------------


def test_strip_doas_block_keeps_foreign_rules() -> None:
    foreign = "permit persist :wheel\n"
    text = foreign + tbmod._DOAS_BLOCK + "permit nopass root\n"
    assert tbmod._strip_doas_block(text) == foreign + "permit nopass root\n"
    assert tbmod._strip_doas_block(foreign) == foreign


def test_workdir_with_space_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Testbed(tmp_path / "a b", count=1)
    with pytest.raises(ValueError):
        Testbed(tmp_path, count=0)


# ---------------------------------------------------------------------------
# sshd testbed (root only)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    if not TESTBED_OK:
        pytest.skip(TESTBED_REASON)
    with Testbed(tmp_path_factory.mktemp("testbed"), count=2) as tb:
        yield tb


@needs_testbed
def test_ensure_users_idempotent() -> None:
    first = tbmod.ensure_users()
    sudoers = tbmod.SUDOERS_PATH.read_bytes()
    doas = tbmod.DOAS_CONF_PATH.read_text()
    second = tbmod.ensure_users()
    assert first == second
    assert first.alice.name == ALICE and first.alice.password == ALICE_PASSWORD
    assert first.bob.name == BOB and first.bob.password == BOB_PASSWORD
    assert tbmod.SUDOERS_PATH.read_bytes() == sudoers
    assert tbmod.DOAS_CONF_PATH.read_text() == doas
    assert doas.count(tbmod.DOAS_BLOCK_BEGIN) == 1
    assert f"permit {ALICE}\n" in doas
    subprocess.run(["visudo", "-cf", str(tbmod.SUDOERS_PATH)], check=True,
                   capture_output=True, timeout=30)


@needs_testbed
@pytest.mark.parametrize("user", ["root", ALICE, BOB])
def test_ssh_commands_skip_bashrc(testbed: Testbed, user: str) -> None:
    for host in testbed:
        proc = host.ssh_run(REMOTE_PROBE, user)
        assert proc.returncode == 0, proc.stderr
        # SHLVL=1 from sshd, +1 by bash: ~/.bashrc (pyenv init) was skipped.
        assert proc.stdout.split() == ["2", user, "1"]


@needs_testbed
def test_known_hosts_and_argv(testbed: Testbed) -> None:
    lines = testbed.known_hosts_path.read_text().splitlines()
    assert len(lines) == len(testbed) == 2
    for n, host in enumerate(testbed, start=1):
        assert host.address == f"127.0.1.{10 + n}"
        assert lines[n - 1] == f"[{host.address}]:{host.port} {host.host_key_pub}"
        assert host.host_key_pub.startswith("ssh-ed25519 ")
        argv = host.ssh_argv(ALICE)
        assert argv[:5] == ["ssh", "-p", str(host.port), "-i", str(host.key_path)]
        assert argv[-1] == f"{ALICE}@{host.address}"
        assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv
    assert len({h.port for h in testbed} | {0}) == 3


@needs_testbed
def test_sudo_with_password_on_stdin(testbed: Testbed) -> None:
    host = testbed[0]
    proc = host.ssh_run("sudo -S -p PROMPT: -u msvc-bob id -un", ALICE,
                        input=ALICE_PASSWORD + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "msvc-bob\n"
    assert "PROMPT:" in proc.stderr

    wrong = host.ssh_run("sudo -S -p PROMPT: -u msvc-bob id -un", ALICE,
                         input="not-the-password\n")
    assert wrong.returncode != 0
    assert wrong.stdout == ""

    bob = host.ssh_run("sudo -S -p PROMPT: id -un", BOB,
                       input=BOB_PASSWORD + "\n")
    assert bob.returncode != 0
    assert "not in the sudoers file" in bob.stderr


@needs_testbed
def test_password_login_works_without_pam(testbed: Testbed,
                                          tmp_path: Path) -> None:
    """UsePAM no: sshd checks /etc/shadow itself; password auth still works."""
    askpass = tmp_path / "askpass"
    askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$TESTBED_PW"\n')
    askpass.chmod(0o755)
    host = testbed[1]
    base = [
        "ssh", "-p", str(host.port),
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={host.known_hosts_path}",
        "-o", "PubkeyAuthentication=no",
        "-o", "PreferredAuthentications=password",
        "-o", "NumberOfPasswordPrompts=1",
        "-o", "ControlMaster=no",
        f"{ALICE}@{host.address}", "id -un",
    ]
    for password, ok in ((ALICE_PASSWORD, True), ("wrong", False)):
        env = dict(os.environ, SSH_ASKPASS=str(askpass),
                   SSH_ASKPASS_REQUIRE="force", TESTBED_PW=password)
        proc = subprocess.run(base, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=30)
        if ok:
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout == f"{ALICE}\n"
        else:
            assert proc.returncode == 255
            assert "Permission denied" in proc.stderr


@needs_testbed
def test_ssh_through_latency_proxy(testbed: Testbed) -> None:
    host = testbed[0]
    delay = 0.05
    with LatencyProxy(target=(host.address, host.port), delay=delay) as proxy:
        proc = host.ssh_run(REMOTE_PROBE, via=proxy.address)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["2", "root", "1"]

        cat = subprocess.Popen(
            host.ssh_argv(via=proxy.address) + ["cat"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert cat.stdin is not None and cat.stdout is not None
            cat.stdin.write(b"warmup\n")
            cat.stdin.flush()
            assert _readline(cat.stdout, 20) == b"warmup\n"
            rtts = []
            for i in range(3):
                line = f"line {i}\n".encode()
                t0 = time.monotonic()
                cat.stdin.write(line)
                cat.stdin.flush()
                assert _readline(cat.stdout, 10) == line
                rtts.append(time.monotonic() - t0)
            cat.stdin.close()
            assert cat.wait(10) == 0
        finally:
            if cat.poll() is None:
                cat.kill()
                cat.wait(5)
            for pipe in (cat.stdout, cat.stderr):
                if pipe is not None:
                    pipe.close()
        assert proxy.stats.connections_total == 2
    assert min(rtts) >= 2 * delay, rtts
    assert statistics.median(rtts) < 2 * delay + 0.25, rtts


def _zombie_children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = tbmod._proc_stat(int(entry))
            if info is not None and info[0] == pid and info[1] == "Z":
                found.append(int(entry))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@needs_testbed
def test_sessions_leave_no_zombies(testbed: Testbed) -> None:
    """Orphaned session processes are reaped by the subreaper supervisor."""
    host = testbed[0]
    assert host.pid is not None
    for user in ("root", ALICE):
        assert host.ssh_run("true", user).returncode == 0
    deadline = time.monotonic() + 5
    while _zombie_children(host.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _zombie_children(host.pid) == []


@needs_testbed
def test_stop_kills_everything(tmp_path: Path) -> None:
    tb = Testbed(tmp_path / "tb", count=1).start()
    host = tb[0]
    config = str(host.config_path)
    # A process that daemonises itself (setsid + fork) escapes its session...
    daemon = host.ssh_run(
        "setsid -f sleep 120.5 </dev/null >/dev/null 2>&1; echo ok", ALICE
    )
    assert daemon.stdout == "ok\n", daemon.stderr
    # ...and a session that is still open when stop() runs.
    session = subprocess.Popen(
        host.ssh_argv(ALICE) + ["echo started; exec sleep 120"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert session.stdout is not None
        assert _readline(session.stdout, 20) == b"started\n"
        pids = host.process_tree()
        # supervisor, listener, per-connection monitor + user child, sleeps
        assert len(pids) >= 5, pids
        assert any(_cmdline(p) == b"sleep\x00120.5\x00" for p in pids)
        assert host.pid_path.exists()
        tb.stop()
        assert not tb.running
        assert not host.pid_path.exists()
        for pid in pids:
            # Gone entirely: not even a zombie left behind.
            assert tbmod._proc_stat(pid) is None, (pid, _cmdline(pid))
        assert not _port_open(host.address, host.port)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                assert config.encode() not in _cmdline(int(entry))
                assert _cmdline(int(entry)) != b"sleep\x00120.5\x00"
        assert session.wait(10) == 255  # client noticed the dead server
    finally:
        tb.stop()
        if session.poll() is None:
            session.kill()
            session.wait(5)
        if session.stdout is not None:
            session.stdout.close()
