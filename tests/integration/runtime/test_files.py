"""FileService and get_file with real processes: local agents (and a forked
child) pull files from the controller's FileService.

Test-only, controller side. The receiving code runs in the agents from
``_files_remote`` (shipped with ``extra_modules``).
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _files_remote as fr  # noqa: E402
from ansible_mitogen_svc import (AllowAny, BrokenError, CallError, Context,  # noqa: E402
                                 Pool, RefusedError, Router, Service, call, connect,
                                 current_call, expose)
from ansible_mitogen_svc.files import SERVICE_NAME, FileService, get_file  # noqa: E402
from ansible_mitogen_svc.wire import FLAG_RAW, Message  # noqa: E402

pytestmark = pytest.mark.timeout(90)

HELPERS = ["_files_remote"]
AGENT = "ansible_mitogen_svc.agent.AgentService"
MiB = 1024 * 1024
REFUSED = "ansible_mitogen_svc.errors.RefusedError"


# -- helpers and fixtures ---------------------------------------------------------------
def _alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as fp:
            raw = fp.read()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2:].split()[0] != b"Z"


def _wait_for(what: str, predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s: not within %.0fs" % (what, timeout))
        time.sleep(0.02)


def _rss() -> int:
    with open("/proc/self/status") as fp:
        for line in fp:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class RssSampler:
    """Samples this process's VmRSS every 10 ms in a thread."""

    def __init__(self) -> None:
        self.baseline = _rss()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        """Stop; returns the growth over the baseline in bytes."""
        self._stop.set()
        self._thread.join(5.0)
        self.peak = max(self.peak, _rss())
        return self.peak - self.baseline


class Env:
    """A controller Router with a Pool serving a FileService, plus the
    local agents started from it. close() tears everything down and waits
    for every agent and fork parent process to be gone."""

    def __init__(self, service_class: Any = FileService, **service_kwargs: Any) -> None:
        self.router = Router(name="controller")
        self.service = service_class(self.router, **service_kwargs)
        self.pool = Pool(self.router, [self.service], size=4)
        self.me = self.router.context(0, "controller")
        self.pids: List[int] = []

    def call(self, method: str, **kwargs: Any) -> Any:
        return call(self.me, SERVICE_NAME, method, **kwargs)

    def stats(self) -> Dict[str, int]:
        return self.call("statistics")

    def agent(self, name: str) -> Context:
        ctx = connect.local(self.router, name=name, extra_modules=HELPERS, timeout=30.0)
        info = call(ctx, AGENT, "info")
        self.pids += [ctx.pid, info["fork_parent_pid"]]  # type: ignore[attr-defined]
        return ctx

    def close(self) -> None:
        try:
            self.pool.stop(5.0)
        finally:
            self.router.shutdown()
            self.router.join(20.0)
        _wait_for("agent processes gone %s" % self.pids,
                  lambda: not [p for p in self.pids if _alive(p)], 10.0)


@pytest.fixture
def make_env() -> Iterator[Callable[..., Env]]:
    made: List[Env] = []

    def make(**service_kwargs: Any) -> Env:
        made.append(Env(**service_kwargs))
        return made[-1]
    try:
        yield make
    finally:
        for env in made:
            env.close()


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()


def _random_file(path: str, size: int) -> str:
    """Write ``size`` random bytes in 1 MiB blocks; returns their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as fp:
        left = size
        while left:
            block = os.urandom(min(MiB, left))
            digest.update(block)
            fp.write(block)
            left -= len(block)
    return digest.hexdigest()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def _refusal(ctx: Context, path: str, **kwargs: Any) -> CallError:
    with pytest.raises(CallError) as info:
        ctx.call(fr.fetch_sha256, path, **kwargs)
    return info.value


# -- tests ------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_four_agents_pull_256mib_concurrently_in_bounded_memory(env: Env, tmp_path: Any) -> None:
    size = 256 * MiB
    path = str(tmp_path / "big.bin")
    expected = _random_file(path, size)
    env.call("register", path=path)
    agents = [env.agent("pull%d" % i) for i in range(4)]

    sampler = RssSampler()
    started = time.monotonic()
    pending = [a.call_async(fr.fetch_sha256, path, timeout=60.0) for a in agents]
    try:
        results = [p.get(150.0) for p in pending]
    finally:
        growth = sampler.stop()
        os.unlink(path)  # pytest keeps old tmp_paths: do not leave 256 MiB behind
    elapsed = time.monotonic() - started

    for r in results:
        assert r["size"] == size
        assert r["sha256"] == expected
        assert r["meta"]["size"] == size and r["meta"]["path"] == path
    print("\n4 x 256 MiB in %.2fs: %.0f MB/s aggregate, %.0f MB/s per agent (slowest), "
          "serving RSS grew %.1f MiB" % (elapsed, 4 * size / elapsed / 1e6,
                                          size / max(r["seconds"] for r in results) / 1e6,
                                          growth / MiB))
    assert growth < 64 * MiB, "serving process RSS grew by %.1f MiB" % (growth / MiB)
    stats = env.stats()
    assert stats["active"] == 0 and stats["in_flight"] == 0 and stats["starved"] == 0
    assert stats["completed"] == 4 and stats["aborted"] == 0
    assert stats["bytes_sent"] == 4 * size


def test_files_arrive_intact_with_their_metadata(env: Env, tmp_path: Any) -> None:
    served = tmp_path / "served"
    (served / "sub").mkdir(parents=True)
    sizes = {"empty": 0, "one": 1, "chunk": 128 * 1024, "chunk_plus_one": 128 * 1024 + 1,
             "sub/odd": 1337 * 1001}
    digests = {name: _random_file(str(served / name), n) for name, n in sizes.items()}
    os.chmod(str(served / "one"), 0o640)
    os.symlink("sub/odd", str(served / "inner_link"))   # stays inside the prefix
    lone = tmp_path / "lone.txt"
    lone.write_bytes(b"registered on its own\n")
    assert env.call("register_prefix", path=str(served)) == os.path.realpath(str(served))
    env.call("register", path=str(lone))

    agent = env.agent("meta")
    out = tmp_path / "out"
    out.mkdir()
    for name, n in sizes.items():
        dest = str(out / name.replace("/", "_"))
        r = agent.call(fr.fetch_sha256, str(served / name), out_path=dest)
        assert r["size"] == n and r["sha256"] == digests[name] == _sha256(dest)
        st = os.stat(str(served / name))
        meta = r["meta"]
        assert meta["size"] == n and meta["mode"] == st.st_mode & 0o7777
        assert meta["mtime"] == st.st_mtime and meta["uid"] == st.st_uid
    assert agent.call(fr.fetch_sha256, str(served / "one"))["meta"]["mode"] == 0o640
    via_link = agent.call(fr.fetch_sha256, str(served / "inner_link"))
    assert via_link["sha256"] == digests["sub/odd"]
    assert agent.call(fr.fetch_sha256, str(lone))["sha256"] == \
        hashlib.sha256(b"registered on its own\n").hexdigest()

    # A forked child of the agent: the data is routed through the agent.
    child = connect.fork(agent, name="child")
    r = child.call(fr.fetch_sha256, str(served / "sub/odd"), source="controller")
    assert r["sha256"] == digests["sub/odd"]

    stats = env.stats()
    assert stats["completed"] == len(sizes) + 4 and stats["aborted"] == 0
    assert stats["active"] == 0 and stats["in_flight"] == 0
    assert stats["registered_paths"] == 1 and stats["registered_prefixes"] == 1


def test_unregistered_paths_are_refused(env: Env, tmp_path: Any) -> None:
    served = tmp_path / "served"
    served.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"top secret\n")
    env.call("register_prefix", path=str(served))
    agent = env.agent("refused")

    dest = str(tmp_path / "dest")
    err = _refusal(agent, str(secret), out_path=dest)
    assert err.type_name == REFUSED
    assert repr(str(secret)) in err.message and "not a registered file" in err.message
    assert not os.path.exists(dest), "a refused fetch must not leave a partial file"

    err = _refusal(agent, "served/x")
    assert err.type_name == REFUSED and "'served/x' is not an absolute path" in err.message

    # Registered, but missing or not a file: the OSError, naming the path.
    missing = str(served / "missing")
    err = _refusal(agent, missing)
    assert err.type_name == "builtins.FileNotFoundError" and missing in err.message
    (served / "adir").mkdir()
    err = _refusal(agent, str(served / "adir"))
    assert err.type_name == "builtins.IsADirectoryError"

    # In-process too: the caller gets a real RefusedError naming the path.
    with pytest.raises(RefusedError, match="secret.txt"):
        get_file(env.me, str(secret), fr._HashSink(), timeout=10.0)

    stats = env.stats()
    assert stats["active"] == 0 and stats["started"] == 0


def test_escapes_from_a_prefix_are_refused(env: Env, tmp_path: Any) -> None:
    served = tmp_path / "served"
    served.mkdir()
    (served / "ok.txt").write_bytes(b"fine\n")
    (tmp_path / "secret.txt").write_bytes(b"top secret\n")
    (tmp_path / "served2").mkdir()                       # shares the prefix's spelling
    (tmp_path / "served2" / "other.txt").write_bytes(b"not served\n")
    os.symlink(str(tmp_path / "secret.txt"), str(served / "link"))
    os.symlink("..", str(served / "up"))
    env.call("register_prefix", path=str(served))
    agent = env.agent("escape")

    assert agent.call(fr.fetch_sha256, str(served / "ok.txt"))["size"] == 5
    escapes = [
        str(served) + "/../secret.txt",
        str(served) + "/nonexistent/../../secret.txt",
        str(served / "link"),
        str(served / "up" / "secret.txt"),
        str(served / "up" / "served2" / "other.txt"),
        str(tmp_path / "served2" / "other.txt"),
        str(served) + "/../served2/other.txt",
    ]
    for path in escapes:
        err = _refusal(agent, path)
        assert err.type_name == REFUSED, (path, err)
        assert repr(path) in err.message, (path, err.message)

    # register() stores the realpath: re-pointing a registered symlink
    # does not carry the registration to the new target.
    (tmp_path / "a.txt").write_bytes(b"A\n")
    pointer = tmp_path / "pointer"
    os.symlink(str(tmp_path / "a.txt"), str(pointer))
    env.call("register", path=str(pointer))
    assert agent.call(fr.fetch_sha256, str(pointer))["size"] == 2
    os.unlink(str(pointer))
    os.symlink(str(tmp_path / "secret.txt"), str(pointer))
    assert _refusal(agent, str(pointer)).type_name == REFUSED

    stats = env.stats()
    assert stats["completed"] == 2 and stats["active"] == 0


def _start_slow_pull(env: Env, receiver: Context, path: str) -> Any:
    """Start a deliberately slow pull (the sink sleeps per chunk) and wait
    until it is under way."""
    pending = receiver.call_async(fr.fetch_sha256, path, delay=0.02, timeout=30.0,
                                  source="controller")
    _wait_for("transfer under way", lambda: env.stats()["bytes_sent"] >= 1 * MiB, 20.0)
    assert env.stats()["active"] == 1
    return pending


def _assert_cleaned_up(env: Env) -> Dict[str, int]:
    stats = _wait_for("sender state released",
                      lambda: (lambda s: s if s["active"] == 0 else None)(env.stats()), 5.0)
    assert stats["aborted"] == 1 and stats["completed"] == 0
    assert stats["in_flight"] == 0 and stats["starved"] == 0
    return stats


def test_killed_receiver_is_cleaned_up(env: Env, tmp_path: Any) -> None:
    path = str(tmp_path / "sparse.bin")
    with open(path, "wb") as fp:
        fp.truncate(64 * MiB)
    env.call("register", path=path)
    victim = env.agent("victim")
    bystander = env.agent("bystander")

    pending = _start_slow_pull(env, victim, path)
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    _assert_cleaned_up(env)
    with pytest.raises(BrokenError):
        pending.get(10.0)

    small = tmp_path / "small.bin"
    digest = _random_file(str(small), 300 * 1024)
    env.call("register", path=str(small))
    assert bystander.call(fr.fetch_sha256, str(small))["sha256"] == digest


def test_killed_forked_receiver_is_cleaned_up(env: Env, tmp_path: Any) -> None:
    """The receiver is a forked child below an agent: the controller's
    stream to the agent stays up, the agent reports the loss."""
    path = str(tmp_path / "sparse.bin")
    with open(path, "wb") as fp:
        fp.truncate(64 * MiB)
    env.call("register", path=path)
    agent = env.agent("parent")
    child = connect.fork(agent, name="victim")

    pending = _start_slow_pull(env, child, path)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    _assert_cleaned_up(env)
    with pytest.raises((BrokenError, CallError)):
        pending.get(10.0)
    assert call(agent, AGENT, "ping") is True


def test_a_tight_shared_budget_still_serves_everyone(make_env: Callable[..., Env],
                                                     tmp_path: Any) -> None:
    """One window of budget for three transfers: they take turns."""
    env = make_env(window=256 * 1024, chunk_size=64 * 1024, max_in_flight=256 * 1024)
    path = str(tmp_path / "f.bin")
    digest = _random_file(path, 8 * MiB + 12345)
    env.call("register", path=path)
    agents = [env.agent("share%d" % i) for i in range(3)]
    pending = [a.call_async(fr.fetch_sha256, path, timeout=30.0) for a in agents]
    assert [p.get(60.0)["sha256"] for p in pending] == [digest] * 3
    stats = env.stats()
    assert stats["completed"] == 3 and stats["active"] == 0
    assert stats["in_flight"] == 0 and stats["starved"] == 0


def test_stalled_receiver_is_dropped_after_its_timeout(env: Env, tmp_path: Any) -> None:
    path = str(tmp_path / "f.bin")
    with open(path, "wb") as fp:
        fp.truncate(16 * MiB)
    env.call("register", path=path)
    agent = env.agent("staller")
    started = time.monotonic()
    r = agent.call(fr.stall, path, 1.0)
    assert 1.0 <= time.monotonic() - started < 10.0
    assert r["chunks"] * 128 * 1024 == r["window"]          # exactly one window, no more
    assert r["last"]["error"]["type"] == "ansible_mitogen_svc.errors.TimeoutError"
    assert "no acknowledgement" in r["last"]["error"]["message"]
    stats = env.stats()
    assert stats["active"] == 0 and stats["aborted"] == 1 and stats["in_flight"] == 0


def test_receiver_failure_aborts_the_sender(env: Env, tmp_path: Any) -> None:
    path = str(tmp_path / "f.bin")
    _random_file(path, 8 * MiB)
    env.call("register", path=path)
    agent = env.agent("diskfull")
    with pytest.raises(CallError) as info:
        agent.call(fr.fetch_sha256, path, fail_after=MiB)
    assert info.value.type_name == "builtins.OSError"
    assert "No space left" in info.value.message
    stats = _wait_for("sender state released",
                      lambda: (lambda s: s if s["active"] == 0 else None)(env.stats()), 5.0)
    assert stats["aborted"] == 1 and stats["in_flight"] == 0


class RogueFileService(Service):
    """Impersonates FileService to send receivers broken streams. Every
    message sent to its acknowledgement handle is kept in ``received``."""

    name = SERVICE_NAME

    def __init__(self, router: Router) -> None:
        super().__init__(router)
        self.received: List[Any] = []
        self.ack_handle = router.add_handler(lambda msg, caller: self.received.append(msg.data()))

    @expose(AllowAny())
    def fetch(self, path: str, handle: int, timeout: float = 1.0, window: int = 0) -> None:
        info = current_call()
        dst = info.caller.context_id
        size = {"/stall": 1000, "/overrun": 10}.get(path, 100)
        info.defer_reply().send({"size": size, "mode": 0o644, "mtime": 0.0, "path": path,
                                 "window": 4 * MiB, "ack_handle": self.ack_handle})

        def chunk(offset: int, data: bytes) -> None:
            self.router.send(Message(dst, 0, 0, handle, 0, FLAG_RAW,
                                     offset.to_bytes(8, "big") + data))

        def marker(body: Any) -> None:
            self.router.send(Message.encoded(dst, 0, handle, body))

        if path == "/disorder":
            chunk(50, b"x" * 50)
        elif path == "/short":
            chunk(0, b"x" * 60)
            marker({"end": 60})
        elif path == "/overrun":
            chunk(0, b"x" * 20)
        elif path == "/error":
            chunk(0, b"x" * 10)
            marker({"error": {"type": "builtins.OSError", "message": "disk on fire"}})
        elif path == "/garbage":
            marker(["what", "is", "this"])


@pytest.mark.parametrize("path, type_name, words", [
    ("/stall", "ansible_mitogen_svc.errors.TimeoutError", "nothing arrived for 1.0s"),
    ("/disorder", "ansible_mitogen_svc.errors.LocalProtocolError",
     "out-of-order chunk at offset 50, expected offset 0"),
    ("/short", "ansible_mitogen_svc.errors.LocalProtocolError", "short file"),
    ("/overrun", "ansible_mitogen_svc.errors.LocalProtocolError", "overrun"),
    ("/error", "builtins.OSError", "disk on fire"),
    ("/garbage", "ansible_mitogen_svc.errors.LocalProtocolError", "unexpected message"),
])
def test_receiver_rejects_broken_streams(make_env: Callable[..., Env], tmp_path: Any,
                                         path: str, type_name: str, words: str) -> None:
    env = make_env(service_class=RogueFileService)
    agent = env.agent("victim")
    dest = str(tmp_path / "dest")
    with pytest.raises(CallError) as info:
        agent.call(fr.fetch_sha256, path, out_path=dest, timeout=1.0)
    assert info.value.type_name == type_name
    assert words in info.value.message and repr(path) in info.value.message
    assert not os.path.exists(dest), "a failed fetch must not leave a partial file"
    # The receiver told the sender it gave up.
    _wait_for("abort message", lambda: env.service.received, 5.0)
    assert "abort" in env.service.received[-1]


def test_file_shrinking_under_the_sender_is_reported(env: Env, tmp_path: Any) -> None:
    path = str(tmp_path / "sparse.bin")
    with open(path, "wb") as fp:
        fp.truncate(64 * MiB)
    env.call("register", path=path)
    agent = env.agent("shrink")
    pending = _start_slow_pull(env, agent, path)
    os.truncate(path, 0)
    with pytest.raises(CallError) as info:
        pending.get(30.0)
    assert info.value.type_name == "builtins.OSError"
    assert "shrank while being sent" in info.value.message and path in info.value.message
    stats = env.stats()
    assert stats["active"] == 0 and stats["aborted"] == 1 and stats["in_flight"] == 0
