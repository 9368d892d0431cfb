"""The controller multiplexer: one process that owns every agent of a run.

Runs on: the controller only (not shipped). Started by the Ansible strategy
plugins as ``python -S -c "...mux.main()"`` with the collection root on
``PYTHONPATH`` (``plugins/plugin_utils/_mux.py``); never imports ansible.
It names itself ``msvc-mux`` (``ps -o comm``).

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
4. Lifetime: the mux's stdin is a pipe (its *lifeline*) whose write end
   only the parent (ansible-playbook and the workers it forks) holds. EOF
   on it, or being re-parented (ansible-playbook died, even by SIGKILL,
   while a worker still holds the pipe), shuts the router down: every
   agent stream closes and every agent exits; the socket directory is
   removed.

Start-up: the parent creates the private directory, binds and listens on
the socket and passes it to the mux (``main(fd, directory)``), so it knows
the path at once; workers that connect before the mux serves wait in the
socket's backlog, and fail cleanly (connection refused) once the mux died.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import bootstrap, codec, connect
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
           "main", "SOCKET_NAME"]

LOG = logging.getLogger("ansible_mitogen_svc.mux")

SOCKET_NAME = "mux.sock"
TARGET_MODULE = "ansible_mitogen_svc.target"
RUNNER_MODULE = "ansible_mitogen_svc.runner"
#: Seconds an ssh agent start may take beyond ssh's own ConnectTimeout.
SSH_BOOTSTRAP_ALLOWANCE = 20.0
ASYNCJOB_MODULE = "ansible_mitogen_svc.asyncjob"
#: Modules every agent the mux starts gets beyond the runtime.
AGENT_MODULES = [TARGET_MODULE, RUNNER_MODULE, ASYNCJOB_MODULE]
#: Chained (become) agents kept per base route, least recently got stopped
#: first; a spec's ``become_cap`` overrides it. An idle agent costs ~20 MB
#: of target memory and nothing on the wire; 8 covers plays that switch
#: among a handful of become users without restarting interpreters.
BECOME_CAP = 8
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


class _Route:
    """One started agent in ConnectionService's table: a base route (an
    agent the mux started) or one hop of a chain (started by its parent)."""

    __slots__ = ("ctx", "executable", "path", "used", "fresh")

    def __init__(self, ctx: Context, executable: str, path: Tuple[bytes, ...]) -> None:
        self.ctx = ctx
        self.executable = executable
        self.path = path  # keys from the base route down to this one
        self.used = time.monotonic()
        self.fresh = True  # no get() has been answered with it yet


class _Start:
    """A start in flight: callers for the same route wait for it and share
    its agent or its error (one password attempt, not one per caller)."""

    def __init__(self, path: Tuple[bytes, ...]) -> None:
        self.path = path
        self.done = threading.Event()
        self.route: Optional[_Route] = None
        self.error: Optional[BaseException] = None


def _hop_identity(hop: Dict[str, Any]) -> Any:
    """What makes two hops the same agent: their ``key`` if given (the
    become helper masks the per-task random parts of the command there),
    else every field but the timeout."""
    if not isinstance(hop, dict):
        raise TypeError("every hop of a chain must be a dict, not %s" % type(hop).__name__)
    if "key" in hop:
        return hop["key"]
    return {k: v for k, v in hop.items() if k != "timeout"}


def route_path(spec: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Dict[str, Any]],
                                              Tuple[bytes, ...]]:
    """Split ``spec`` into its base route, its chain of hops and the keys
    of every prefix of the route (base first)."""
    base = {k: v for k, v in spec.items() if k not in ("chain", "become_cap")}
    chain = spec.get("chain") or []
    if not isinstance(chain, list):
        raise TypeError("spec['chain'] must be a list of hops")
    ids = [_hop_identity(h) for h in chain]
    keys = [codec.canonical_key(base)]
    keys += [codec.canonical_key((base, ids[:i + 1])) for i in range(len(ids))]
    return base, chain, tuple(keys)


class ConnectionService(DeduplicatingService):
    """Get-or-create one agent per route spec. Identical concurrent get()
    calls share one computation (DeduplicatingService); concurrent starts of
    one route, or of a common prefix of two chains, share one start.

    A spec is a dict of builtin values; ``kind`` picks the transport:

    * ``{"kind": "local", "python": ...}``
    * ``{"kind": "ssh", "host", "ssh_path", "ssh_args" (list), "python",
      "password", "single_prompt", "prompt", "timeout"}``: ``ssh_args`` already
      carries port, user, key and every other option, so two specs differing
      in any of them are two routes (``single_prompt``, ``prompt``: see
      :func:`connect.ssh`).

    Become: ``spec["chain"]`` is a list of hops (see :mod:`connect`), each
    agent started by the previous one (e.g. sudo to root, then su to
    alice). Every prefix of the chain is its own route: keyed by the base
    spec and the hops' identities (a hop's ``key`` field if present). At
    most ``spec["become_cap"]`` (default :data:`BECOME_CAP`) chained agents
    are kept per base route; beyond that, the least recently got ones are
    stopped, with whatever was chained below them.
    """

    name = "ansible_mitogen_svc.mux.ConnectionService"

    def __init__(self, router: Router, files: FileService) -> None:
        super().__init__(router)
        self._files = files
        self._lock = threading.Lock()
        self._routes: Dict[bytes, _Route] = {}
        self._starts: Dict[bytes, _Start] = {}

    @expose(TrustedWorkers())
    @arg_spec({"spec": dict})
    def get(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        """Returns ``{"id", "name", "executable", "fresh"}`` of the agent at
        the end of the route (``executable``: its ``sys.executable``; ``fresh``:
        True for the one caller answered first after it started, so nothing
        can have been sent to it yet), starting it and its parents if
        needed. Raises BootstrapError/PasswordError when one cannot start."""
        base, chain, keys = route_path(spec)
        cap = int(spec.get("become_cap", BECOME_CAP))
        route = self._ensure(keys[:1], lambda parent: self._start(base))
        for i, hop in enumerate(chain):
            route = self._ensure(keys[:i + 2], functools.partial(connect.hop, spec=hop), route)
        self._touch(route, cap)
        with self._lock:
            fresh, route.fresh = route.fresh, False
        return {"id": route.ctx.context_id, "name": route.ctx.name,
                "executable": route.executable, "fresh": fresh}

    @expose(TrustedWorkers())
    @arg_spec({"spec": dict})
    def reset(self, spec: Dict[str, Any]) -> bool:
        """Stop the agent at the end of the route, and every agent chained
        below it (for a base route: all its become agents); the next get()
        starts new ones. False if it was not running."""
        key = route_path(spec)[2][-1]
        with self._lock:
            gone = self._drop(key)
        for route in gone[:1]:
            self._stop(route)
        return bool(gone)

    @expose(TrustedWorkers())
    @arg_spec({"path": str})
    def register_file(self, path: str) -> str:
        """Let agents pull ``path`` from our FileService."""
        return self._files.register(path)

    @expose(TrustedWorkers())
    def statistics(self) -> Dict[str, int]:
        """``routes``: base agents; ``chained``: become agents below them."""
        with self._lock:
            base = sum(1 for r in self._routes.values() if len(r.path) == 1)
            return {"routes": base, "chained": len(self._routes) - base}

    @expose(TrustedWorkers())
    def counters(self) -> List[Dict[str, Any]]:
        """Traffic on the stream to each base agent since it started (its
        become agents and forked children share that stream): one dict per
        live agent with ``name`` (e.g. ``ssh.<host>``), ``id``,
        ``messages_out``/``bytes_out`` (sent towards the target) and
        ``messages_in``/``bytes_in``."""
        with self._lock:
            routes = [r for r in self._routes.values() if len(r.path) == 1]
        out = []
        for route in routes:
            stream = self.router.stream_to(route.ctx.context_id)
            if stream is None:
                continue
            out.append({"name": route.ctx.name, "id": route.ctx.context_id,
                        "messages_out": stream.messages_out, "bytes_out": stream.bytes_out,
                        "messages_in": stream.messages_in, "bytes_in": stream.bytes_in})
        return out

    # -- the table --------------------------------------------------------------------
    def _ensure(self, path: Tuple[bytes, ...], start: Callable[[Context], Context],
                parent: Optional[_Route] = None) -> _Route:
        """The live route ``path``, or a new one made by ``start(parent
        context)``; one start at a time per route, shared by its callers."""
        key = path[-1]
        with self._lock:
            route = self._routes.get(key)
            if route is not None and self.router.stream_to(route.ctx.context_id) is not None:
                return route
            if route is not None:
                self._drop(key)  # it died: so did everything chained below it
            flight = self._starts.get(key)
            leader = flight is None
            if flight is None:
                flight = self._starts[key] = _Start(path)
        if not leader:
            flight.done.wait()
            if flight.route is None:
                assert flight.error is not None
                raise flight.error
            return flight.route
        try:
            ctx = start(parent.ctx if parent is not None else self.router.context(0))
            # The handshake said which interpreter it is ("" if it could not).
            route = _Route(ctx, str(getattr(ctx, "executable", None) or ""), path)
            flight.route = route
            with self._lock:
                self._routes[key] = flight.route
            return flight.route
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._starts[key]
            flight.done.set()

    def _drop(self, key: bytes) -> List[_Route]:
        """Forget route ``key`` and every route chained below it (lock
        held); returns them, ``key``'s own route first."""
        gone = [r for k, r in self._routes.items() if key in r.path]
        gone.sort(key=lambda r: len(r.path))
        for r in gone:
            del self._routes[r.path[-1]]
        return gone

    def _touch(self, route: _Route, cap: int) -> None:
        """Mark ``route`` and its parents used; stop the least recently
        used become agents of its base route beyond ``cap``."""
        now = time.monotonic()
        victims: List[_Route] = []
        with self._lock:
            for key in route.path:
                r = self._routes.get(key)
                if r is not None:
                    r.used = now
            chained = sorted((r for r in self._routes.values()
                              if len(r.path) > 1 and r.path[0] == route.path[0]),
                             key=lambda r: r.used)
            excess = len(chained) - max(0, cap)
            # Never the route just got, nor the parent of a start in flight.
            busy = set(route.path).union(*(f.path for f in self._starts.values()))
            for r in chained:
                if excess <= 0:
                    break
                if r.path[-1] in busy or r.path[-1] not in self._routes:
                    continue  # in use, or already gone with its parent
                gone = self._drop(r.path[-1])
                excess -= len(gone)
                victims.append(gone[0])
        for r in victims:
            LOG.debug("mux: evicting idle become agent %s", r.ctx.name)
            self._stop(r)

    def _stop(self, route: _Route) -> None:
        """Stop one agent; those chained below it see EOF and exit too."""
        if len(route.path) == 1:
            stream = self.router.stream_to(route.ctx.context_id)
            if stream is not None:
                self.router.broker.close_stream(stream)
            return
        try:
            route.ctx.shutdown()
        except Exception as exc:  # its parent is gone already: nothing to stop
            LOG.debug("mux: could not stop %s: %s", route.ctx.name, exc)

    def _start(self, spec: Dict[str, Any]) -> Context:
        kind = spec.get("kind")
        timeout = float(spec.get("timeout", 30))
        if kind == "local":
            return connect.local(self.router, python=spec.get("python") or sys.executable,
                                 name="local", extra_modules=AGENT_MODULES, timeout=timeout)
        if kind == "ssh":
            # ``timeout`` is ssh's ConnectTimeout: let ssh report its own
            # failure ("Connection timed out during banner exchange"), and
            # give the bootstrap after the login time of its own.
            return connect.ssh(self.router, str(spec["host"]), ssh_args=list(spec["ssh_args"]),
                               python=str(spec.get("python") or "python3"),
                               password=spec.get("password"),
                               name="ssh.%s" % spec["host"], extra_modules=AGENT_MODULES,
                               timeout=timeout + SSH_BOOTSTRAP_ALLOWANCE,
                               ssh_path=str(spec.get("ssh_path") or "ssh"),
                               single_prompt=bool(spec.get("single_prompt")),
                               prompt=str(spec["prompt"]) if spec.get("prompt") else None)
        raise ValueError("unknown route kind %r" % (kind,))


class MuxServer:
    """Router, pool and listening socket of the mux process."""

    def __init__(self, directory: str, listening: socket.socket) -> None:
        """Serve ``listening``, the socket our parent bound and listens on at
        ``directory/mux.sock`` (``directory``: private, 0700, removed at
        :meth:`stop`)."""
        self.directory = directory
        self.path = os.path.join(self.directory, SOCKET_NAME)
        self.router = Router(name="mux")
        files = FileService(self.router)
        self.connections = ConnectionService(self.router, files)
        self.pool = Pool(self.router, [files, JobResultService(self.router), self.connections],
                         size=POOL_SIZE)
        self._sock = listening
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


def _set_comm(name: bytes) -> None:
    """Name this process (``ps -o comm``, /proc/PID/comm) on Linux."""
    try:
        with open("/proc/self/comm", "wb") as fp:
            fp.write(name)
    except OSError:
        pass


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


def main(fd: int, directory: str) -> None:
    """Entry point: serve the listening socket ``fd``, bound by our parent
    at ``directory/mux.sock``, until stdin reaches EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to ansible-playbook
    _set_comm(b"msvc-mux")
    _setup_logging()
    listening = socket.socket(fileno=fd)
    listening.set_inheritable(False)
    server = MuxServer(directory, listening).start()
    # The first agent needs stage 2: build it now, not once a worker asks.
    try:
        bootstrap.stage2(AGENT_MODULES)
    except Exception as exc:  # each agent start then reports it
        LOG.debug("mux: stage 2 not built ahead: %s", exc)
    _wait_for_parent_exit(os.getppid())
    LOG.debug("mux: parent gone, shutting down")
    server.stop()
