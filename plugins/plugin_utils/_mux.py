# PRIVATE to the collection: not a public API, may change without notice.
"""Start the mux (controller main process) and reach it (workers).

Runs on: the controller only. The only glue between Ansible processes and
:mod:`ansible_mitogen_svc.mux`.

* :func:`ensure_mux` runs in the ansible-playbook process (from a strategy's
  ``run()``, before workers fork). It starts the mux once per process and
  remembers its socket path in this module; forked workers inherit it.
* :func:`client` runs in a worker: one connection to the mux per process,
  made on first use. Without a mux (the connection plugin used by FQCN
  under a builtin strategy) the worker hosts the connection services
  itself, so agents then live only as long as the worker.
"""
from __future__ import annotations

import gc
import os
import select
import signal
import sys
import threading
import time
import typing as t
import warnings

from ansible_collections.mitogen.svc.ansible_mitogen_svc import Context, Pool, Router
from ansible_collections.mitogen.svc.ansible_mitogen_svc import mux as _mux_mod
from ansible_collections.mitogen.svc.ansible_mitogen_svc.files import FileService

CONNECTION_SERVICE = _mux_mod.ConnectionService.name
TARGET_MODULE = _mux_mod.TARGET_MODULE
MUX_START_TIMEOUT = 30.0


class MuxStartError(RuntimeError):
    """The mux process could not be started."""


class _MuxProcess:
    def __init__(self, proc: "_ForkedMux", path: str) -> None:
        self.proc = proc
        self.path = path
        self.owner_pid = os.getpid()


_state: dict[str, t.Any] = {"mux": None, "client": None}
_lock = threading.Lock()


class _ForkedMux:
    """The mux: a child forked from this process (ansible-playbook, before
    any worker), so it starts with the runtime already imported instead of
    paying a fresh interpreter's start-up and imports (~0.1-0.2 s of CPU
    on the critical path of every run). Offers what callers use of a
    ``subprocess.Popen``: ``pid``, ``poll``, ``kill``, ``wait`` and the
    READY line on ``stdout``."""

    def __init__(self) -> None:
        lifeline_r, self._lifeline_w = os.pipe()
        ready_r, ready_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():
            # 3.12+ warns about forking a process that has threads; Ansible
            # forks its workers from this same process.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            _mux_child(lifeline_r, ready_w, (self._lifeline_w, ready_r))
        os.close(lifeline_r)
        os.close(ready_w)
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = os.fdopen(ready_r, "rb")

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1  # reaped by someone else: gone
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float = MUX_START_TIMEOUT) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.returncode


def _mux_child(lifeline: int, ready: int, parent_fds: t.Tuple[int, ...]) -> t.NoReturn:
    """In the forked child: become the mux. Never returns."""
    code = 1
    try:
        for fd in parent_fds:
            os.close(fd)
        os.setsid()  # the terminal's signals belong to ansible-playbook
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                    signal.SIGUSR2, signal.SIGALRM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        # Objects inherited from ansible-playbook are never collected here:
        # a collection would walk (and copy) every page of them.
        gc.freeze()
        _set_comm(b"msvc-mux")
        _mux_mod.main(lifeline_fd=lifeline, ready_fd=ready)
        code = 0
    except BaseException:  # report it; never unwind into ansible-playbook's stack
        try:
            import traceback
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        os._exit(code)


def _set_comm(name: bytes) -> None:
    """Name this process (``ps -o comm``, /proc/PID/comm) on Linux."""
    try:
        with open("/proc/self/comm", "wb") as fp:
            fp.write(name)
    except OSError:
        pass


def _spawn_mux() -> _ForkedMux:
    return _ForkedMux()


def _await_mux(proc: _ForkedMux) -> _MuxProcess:
    ready, _, _ = select.select([proc.stdout], [], [], MUX_START_TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    proc.stdout.close()
    if not line.startswith(_mux_mod.READY):
        proc.kill()
        proc.wait()
        raise MuxStartError("mitogen.svc mux failed to start (exit status %s, said %r)"
                            % (proc.returncode, line[:200]))
    # The lifeline's write end stays open here and in every worker forked
    # from here: EOF (our exit, even by SIGKILL, once the workers are gone)
    # stops the mux.
    return _MuxProcess(proc, line[len(_mux_mod.READY):].strip().decode())


def _running() -> bool:
    mux = _state["mux"]
    return mux is not None and mux.owner_pid == os.getpid() and mux.proc.poll() is None


def start_mux() -> None:
    """Start the mux if this process has none, without waiting for it to
    be ready (:func:`ensure_mux` waits): its start-up overlaps with the
    caller's own work."""
    with _lock:
        starting = _state.get("starting")
        if not _running() and (starting is None or starting[0] != os.getpid()):
            _state["starting"] = (os.getpid(), _spawn_mux())


def ensure_mux() -> str:
    """Start the mux if this process has none running; returns its socket
    path. Raises MuxStartError."""
    with _lock:
        if not _running():
            starting = _state.pop("starting", None)
            proc = starting[1] if starting and starting[0] == os.getpid() else _spawn_mux()
            _state["mux"] = _await_mux(proc)
        return t.cast(str, _state["mux"].path)


def mux_path() -> str | None:
    mux = _state["mux"]
    return mux.path if mux is not None else None


class Client:
    """This process's view of the connection services: its Router, the
    context serving ConnectionService (the mux, or ourselves), and the pool
    when we serve it ourselves."""

    def __init__(self, router: Router, service_ctx: Context, pool: Pool | None) -> None:
        self.router = router
        self.service_ctx = service_ctx
        self.pool = pool
        self.pid = os.getpid()

    def connection_call(self, method: str, timeout: float, **kwargs: t.Any) -> t.Any:
        return self.connection_call_async(method, **kwargs).get(timeout)

    def connection_call_async(self, method: str, **kwargs: t.Any) -> t.Any:
        """Send the call; returns its PendingCall."""
        return self.service_ctx.call_service_async(CONNECTION_SERVICE, method, **kwargs)

    def target_call(self, agent_id: int, function: str, *args: t.Any,
                    timeout: float = 3600.0, **kwargs: t.Any) -> t.Any:
        return self.call_function(agent_id, TARGET_MODULE, function, *args, timeout=timeout,
                                  **kwargs)

    def call_function(self, agent_id: int, module: str, function: str, *args: t.Any,
                      timeout: float = 3600.0, **kwargs: t.Any) -> t.Any:
        ctx = self.router.context(agent_id)
        return ctx.call_function_async(module, function, *args, **kwargs).get(timeout)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop(timeout=2.0)
        self.router.shutdown()
        self.router.join(15.0)


def _in_process_client() -> Client:
    router = Router(name="worker.%d" % os.getpid())
    files = FileService(router)
    conns = _mux_mod.ConnectionService(router, files)
    pool = Pool(router, [files, conns], size=4)
    return Client(router, router.context(0, "self"), pool)


def client() -> Client:
    """The Client of this process, connected on first use.

    Raises:
        OSError / ConnectionError: the mux cannot be reached.
    """
    with _lock:
        cur = _state["client"]
        if cur is not None and cur.pid == os.getpid():
            return cur
        path = mux_path()
        if path is None:
            cur = _in_process_client()
        else:
            router, mux = _mux_mod.attach_worker(path)
            cur = Client(router, mux, None)
        _state["client"] = cur
        return cur


def transient_client() -> Client | None:
    """A fresh connection to the mux for one call from the main process
    (``meta: reset_connection``); close it after use. None without a mux."""
    path = mux_path()
    if path is None:
        return None
    router, mux = _mux_mod.attach_worker(path, name="main")
    return Client(router, mux, None)
