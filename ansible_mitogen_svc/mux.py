"""The controller multiplexer: one process that owns every agent of a run.

Runs on: the controller only (not shipped). Started by the Ansible strategy
plugins as ``python -c "...mux.main()"`` with the collection root on
``PYTHONPATH``; never imports ansible.

Theory of operation
-------------------
Ansible forks a fresh worker per host per task, so nothing a worker holds
survives the task. The mux is the long-lived process that does:

1. It is context 0: a :class:`~context.Router` and a :class:`~service.Pool`
   serving :class:`ConnectionService`, :class:`~files.FileService` and
   :class:`~jobs.JobResultService`.
2. It listens on ``<private 0700 dir>/mux.sock``. For every accepted
   connection from a process of the same uid it allocates one id, writes the
   *handshake* (4-byte length + codec dict ``{"id_lo", "id_hi", "parent_id",
   "max_body"}``) and attaches the socket as a ``trusted`` child stream: the
   worker may reach agents (its siblings), agents may not reach workers.
3. A worker asks ``ConnectionService.get(spec)`` for the agent of a route
   (host, user, port, ssh options, python...): it is started once, concurrent
   requests for the same route wait for the one start, and the reply is the
   agent's context id. The worker then calls functions of
   :mod:`~ansible_mitogen_svc.target` on that agent directly.
4. Lifetime: the mux's stdin is a pipe whose write end only the parent
   (ansible-playbook and the workers it forks) holds. EOF on it, or being
   re-parented (ansible-playbook died, even by SIGKILL, while a worker
   still holds the pipe), shuts the router down: every agent stream closes
   and every agent exits; the socket directory is removed.

Startup protocol on stdout: one line ``MSVC-MUX-READY <socket path>\\n``.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
from typing import Any, Dict, Optional, Tuple

from . import codec, connect
from .broker import Stream
from .context import Context, Router
from .files import FileService
from .jobs import JobResultService
from .policy import Caller, Policy
from .protocol import DEFAULT_MAX_BODY
from .router import IdRange
from .service import DeduplicatingService, Pool, arg_spec, expose
from .transport import FdTransport

__all__ = ["ConnectionService", "TrustedWorkers", "MuxServer", "attach_worker",
           "main", "READY", "SOCKET_NAME"]

LOG = logging.getLogger("ansible_mitogen_svc.mux")

READY = b"MSVC-MUX-READY "
SOCKET_NAME = "mux.sock"
TARGET_MODULE = "ansible_mitogen_svc.target"
# Pool threads of the mux: connects block a thread for up to their timeout,
# so allow a connect per fork of a big `forks` setting plus file serving.
POOL_SIZE = 32
# Seconds between checks that ansible-playbook is still our parent.
PARENT_POLL = 0.5
# A handshake is ~60 bytes; anything bigger is not from our mux.
MAX_HANDSHAKE = 4096


class TrustedWorkers(Policy):
    """Allows the mux itself and its trusted worker streams, nobody else
    (agents are children too, but never trusted)."""

    def is_authorized(self, caller: Caller) -> bool:
        return caller.relation == "self" or (caller.relation == "child" and caller.trusted)

    def describe(self) -> str:
        return "TrustedWorkers"


class ConnectionService(DeduplicatingService):
    """Get-or-create one agent per route spec. Concurrent first requests for
    one route share a single start (DeduplicatingService).

    A spec is a dict of builtin values; ``kind`` picks the transport:

    * ``{"kind": "local", "python": ...}``
    * ``{"kind": "ssh", "host", "ssh_path", "ssh_args" (list), "python",
      "password", "timeout"}``: ``ssh_args`` already carries port, user,
      key and every other option, so two specs differing in any of them are
      two routes.
    """

    name = "ansible_mitogen_svc.mux.ConnectionService"

    def __init__(self, router: Router, files: FileService) -> None:
        super().__init__(router)
        self._files = files
        self._lock = threading.Lock()
        self._agents: Dict[bytes, Context] = {}

    @expose(TrustedWorkers())
    @arg_spec({"spec": dict})
    def get(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        """Returns ``{"id", "name"}`` of the route's agent, starting it if
        needed. Raises BootstrapError/PasswordError when it cannot start."""
        key = codec.canonical_key(spec)
        with self._lock:
            ctx = self._agents.get(key)
        if ctx is None or self.router.stream_to(ctx.context_id) is None:
            ctx = self._start(spec)
            with self._lock:
                self._agents[key] = ctx
        return {"id": ctx.context_id, "name": ctx.name}

    @expose(TrustedWorkers())
    @arg_spec({"spec": dict})
    def reset(self, spec: Dict[str, Any]) -> bool:
        """Stop the route's agent (if any); the next get() starts a new one."""
        with self._lock:
            ctx = self._agents.pop(codec.canonical_key(spec), None)
        if ctx is None:
            return False
        stream = self.router.stream_to(ctx.context_id)
        if stream is not None:
            self.router.broker.close_stream(stream)
        return True

    @expose(TrustedWorkers())
    @arg_spec({"path": str})
    def register_file(self, path: str) -> str:
        """Let agents pull ``path`` from our FileService."""
        return self._files.register(path)

    @expose(TrustedWorkers())
    def statistics(self) -> Dict[str, int]:
        with self._lock:
            return {"routes": len(self._agents)}

    def _start(self, spec: Dict[str, Any]) -> Context:
        kind = spec.get("kind")
        timeout = float(spec.get("timeout", 30))
        if kind == "local":
            return connect.local(self.router, python=spec.get("python") or sys.executable,
                                 name="local", extra_modules=[TARGET_MODULE], timeout=timeout)
        if kind == "ssh":
            return connect.ssh(self.router, str(spec["host"]), ssh_args=list(spec["ssh_args"]),
                               python=str(spec.get("python") or "python3"),
                               password=spec.get("password"),
                               name="ssh.%s" % spec["host"], extra_modules=[TARGET_MODULE],
                               timeout=timeout, ssh_path=str(spec.get("ssh_path") or "ssh"))
        raise ValueError("unknown route kind %r" % (kind,))


class MuxServer:
    """Router, pool and listening socket of the mux process."""

    def __init__(self, directory: Optional[str] = None) -> None:
        self.directory = directory or tempfile.mkdtemp(prefix="msvc-mux-")
        os.chmod(self.directory, 0o700)
        self.path = os.path.join(self.directory, SOCKET_NAME)
        self.router = Router(name="mux")
        files = FileService(self.router)
        self.connections = ConnectionService(self.router, files)
        self.pool = Pool(self.router, [files, JobResultService(self.router), self.connections],
                         size=POOL_SIZE)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(128)
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, name="mux.accept", daemon=True)

    def start(self) -> "MuxServer":
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            try:
                self._welcome(conn)
            except Exception as exc:
                LOG.error("mux: refused a worker connection: %s", exc)
                conn.close()

    def _welcome(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            raise PermissionError("peer uid %d is not ours (%d)" % (uid, os.getuid()))
        ids = self.router.allocate(leaf=True)
        body = codec.dumps({"id_lo": ids.lo, "id_hi": ids.hi, "parent_id": self.router.my_id,
                            "max_body": self.router.max_body})
        conn.sendall(struct.pack(">I", len(body)) + body)
        name = "worker.%d" % _pid
        stream = Stream(self.router.broker, FdTransport.from_socket(conn), name,
                        self.router.max_body)
        self.router.attach_child(stream, ids, name, trusted=True)

    def stop(self) -> None:
        """Close the socket, then every stream: agents see EOF and exit."""
        self._stopping = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self.pool.stop(timeout=2.0)
        self.router.shutdown()
        try:
            self.router.join(15.0)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("mux closed the connection during the handshake")
        buf += chunk
    return buf


def attach_worker(path: str, name: str = "worker", timeout: float = 10.0
                  ) -> Tuple[Router, Context]:
    """Worker side: connect to the mux at ``path``; returns our own Router
    (one id, granted by the mux) and the mux's Context.

    Raises:
        OSError: the socket cannot be reached.
        ConnectionError: the handshake failed.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        (size,) = struct.unpack(">I", _read_exact(sock, 4))
        if size > MAX_HANDSHAKE:
            raise ConnectionError("mux handshake of %d bytes is too big" % size)
        cfg = codec.loads(_read_exact(sock, size))
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    ids = IdRange(int(cfg["id_lo"]), int(cfg["id_hi"]))
    router = Router(ids=ids, name="%s.%d" % (name, os.getpid()),
                    max_body=int(cfg.get("max_body", DEFAULT_MAX_BODY)))
    stream = Stream(router.broker, FdTransport.from_socket(sock), "mux", router.max_body)
    mux = router.attach_parent(stream, int(cfg["parent_id"]))
    mux.name = "mux"
    return router, mux


def _setup_logging() -> None:
    level = os.environ.get("MITOGEN_SVC_MUX_LOG_LEVEL", "WARNING").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s mux[%(process)d] %(levelname)s "
                                           "%(name)s: %(message)s"))
    root = logging.getLogger("ansible_mitogen_svc")
    root.addHandler(handler)
    root.setLevel(getattr(logging, level, logging.WARNING))


def _wait_for_parent_exit(parent: int) -> None:
    """Return on EOF on stdin, or once we have been re-parented: forked
    Ansible workers inherit the pipe's write end, so after a SIGKILL of
    ansible-playbook the EOF alone could come as late as a worker's exit."""
    import select
    while os.getppid() == parent:
        try:
            ready, _, _ = select.select([0], [], [], PARENT_POLL)
            if ready and not os.read(0, 4096):
                return
        except OSError:
            return


def main() -> None:
    """Entry point: serve until stdin reaches EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to ansible-playbook
    _setup_logging()
    server = MuxServer().start()
    out = os.fdopen(os.dup(1), "wb")
    out.write(READY + server.path.encode() + b"\n")
    out.close()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # nobody reads our stdout any more
    os.close(null)
    _wait_for_parent_exit(os.getppid())
    LOG.debug("mux: parent gone, shutting down")
    server.stop()
