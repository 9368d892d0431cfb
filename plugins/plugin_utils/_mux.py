# PRIVATE to the collection: not a public API, may change without notice.
"""Start the mux (controller main process) and reach it (workers).

Runs on: the controller only. The only glue between Ansible processes and
:mod:`ansible_mitogen_svc.mux`.

* :func:`ensure_mux` runs in the ansible-playbook process (from a strategy's
  ``run()``, before workers fork). It starts the mux once per process on a
  socket it binds itself, so it never waits for the mux, and remembers the
  socket path in this module; forked workers inherit it.
* :func:`client` runs in a worker: one connection to the mux per process,
  made on first use. Without a mux (the connection plugin used by FQCN
  under a builtin strategy) the worker hosts the connection services
  itself, so agents then live only as long as the worker.
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import typing as t

from ansible_collections.mitogen.svc.ansible_mitogen_svc import Context, Pool, Router
from ansible_collections.mitogen.svc.ansible_mitogen_svc import mux as _mux_mod
from ansible_collections.mitogen.svc.ansible_mitogen_svc.files import FileService

CONNECTION_SERVICE = _mux_mod.ConnectionService.name
TARGET_MODULE = _mux_mod.TARGET_MODULE
# The runtime package directory's parent: the collection root.
_COLLECTION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(_mux_mod.__file__)))
#: Seconds a worker waits for the mux's handshake (the mux may still be
#: starting when the first workers connect).
MUX_START_TIMEOUT = 30.0


class MuxStartError(RuntimeError):
    """The mux process could not be started."""


class _MuxProcess:
    def __init__(self, proc: subprocess.Popen, path: str) -> None:
        self.proc = proc
        self.path = path
        self.owner_pid = os.getpid()


_state: dict[str, t.Any] = {"mux": None, "client": None}
_lock = threading.Lock()


def _spawn_mux() -> _MuxProcess:
    """Start the mux on a socket this process binds: the path is known at
    once, and a worker that connects before the mux is up waits in the
    socket's backlog instead of this process waiting for the mux.

    Raises MuxStartError."""
    directory = tempfile.mkdtemp(prefix="msvc-mux-")  # mode 0700
    path = os.path.join(directory, _mux_mod.SOCKET_NAME)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(128)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_COLLECTION_ROOT, env.get("PYTHONPATH"))
                                            if p)
        code = ("from ansible_mitogen_svc.mux import main; main(%d, %r)"
                % (sock.fileno(), directory))
        # A fresh interpreter, not a fork of this process: forking
        # ansible-playbook was measured to save the start-up but to cost as
        # much again in copy-on-write faults in ansible-playbook while the
        # mux lives (see docs/benchmarks.md). -S: the mux needs only the
        # stdlib and PYTHONPATH.
        proc = subprocess.Popen([sys.executable, "-S", "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, close_fds=True,
                                pass_fds=(sock.fileno(),), start_new_session=True, env=env)
    except OSError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise MuxStartError("mitogen.svc mux failed to start: %s" % exc) from exc
    finally:
        sock.close()  # the mux's copy is the only one: if it dies, connects fail
    # stdin stays open: its write end is the mux's lifeline. EOF (our exit,
    # even by SIGKILL, once forked workers are gone) stops the mux.
    atexit.register(shutil.rmtree, directory, True)
    return _MuxProcess(proc, path)


def _running() -> bool:
    mux = _state["mux"]
    return mux is not None and mux.owner_pid == os.getpid() and mux.proc.poll() is None


def ensure_mux() -> str:
    """Start the mux if this process has none running; returns its socket
    path at once (the mux's start-up overlaps with the caller's work and
    the workers' first steps). Raises MuxStartError."""
    with _lock:
        if not _running():
            _state["mux"] = _spawn_mux()
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

    def mux_lost(self) -> bool:
        """True when this client was attached to a mux that went away."""
        return (self.pool is None
                and self.router.stream_to(self.service_ctx.context_id) is None)

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
        ConnectionError: the mux cannot be reached.
    """
    with _lock:
        cur = _state["client"]
        if cur is not None and cur.pid == os.getpid():
            return cur
        path = mux_path()
        if path is None:
            cur = _in_process_client()
        else:
            cur = _attach(path, "worker")
        _state["client"] = cur
        return cur


def transient_client() -> Client | None:
    """A fresh connection to the mux for one call from the main process
    (``meta: reset_connection``); close it after use. None without a mux."""
    path = mux_path()
    if path is None:
        return None
    return _attach(path, "main")


def _attach(path: str, name: str) -> Client:
    try:
        router, mux = _mux_mod.attach_worker(path, name=name, timeout=MUX_START_TIMEOUT)
    except OSError as exc:
        raise ConnectionError("the mitogen.svc mux (%s) did not answer: %s" % (path, exc)) from exc
    return Client(router, mux, None)
