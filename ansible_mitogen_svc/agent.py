"""Remote entry points: the agent and its forked children.

Runs on: targets (shipped). ``main`` is called by bootstrap stage 2;
``child_main`` by the fork parent in a freshly forked child.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any, Callable, Dict, List, Optional

from . import bootstrap, codec, forkserver
from .broker import Broker, Stream
from .context import Router
from .policy import AllowAny, AllowParents, Caller
from .protocol import DEFAULT_MAX_BODY
from .router import IdRange
from .service import Pool, Service, arg_spec, expose
from .transport import FdTransport
from .wire import HANDLE_SHUTDOWN, Message

__all__ = ["AgentService", "main", "child_main", "fork_server", "at_exit"]

LOG = logging.getLogger("ansible_mitogen_svc.agent")

# This process's fork parent (agents only) and cleanups run when it exits.
_process: Dict[str, Any] = {"fork_server": None, "at_exit": []}
#: What Python's C locale coercion (PEP 538) added to this agent's
#: environment as it started (``{"LC_CTYPE": "C.UTF-8"}`` when the login
#: left the C locale). Taken out again at once, so commands the agent runs
#: see the login's environment as under ``ssh host CMD``; a module gets it
#: back (:func:`runner.run_program`), as vanilla's module Python has it.
COERCED_LOCALE: Dict[str, str] = {}


def fork_server() -> Optional[forkserver.ForkServer]:
    """The virgin fork parent of this agent, or None (forked children)."""
    return _process["fork_server"]


def at_exit(fn: Callable[[], None]) -> None:
    """Run ``fn`` when this agent exits (agents end with os._exit, so
    the atexit module never runs)."""
    _process["at_exit"].append(fn)


def _run_exit_hooks() -> None:
    for fn in reversed(_process["at_exit"]):
        try:
            fn()
        except Exception:
            LOG.exception("exit hook failed")


# Pool threads per agent: enough for concurrent tasks on one host (free
# strategy, delegate_to) without idle memory cost (~60 KiB per thread).
POOL_SIZE = 16


class AgentService(Service):
    """Built-in service of every agent: identity, children, modules."""

    name = "ansible_mitogen_svc.agent.AgentService"

    def __init__(self, router: Router, fork_server: Optional[forkserver.ForkServer],
                 config: Dict[str, Any]) -> None:
        super().__init__(router)
        self.fork_server = fork_server
        self.config = config

    @expose(AllowAny())
    def ping(self) -> bool:
        return True

    @expose(AllowParents())
    def info(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "ppid": os.getppid(), "uid": os.getuid(),
                "euid": os.geteuid(), "id": self.router.my_id, "name": self.router.name,
                "python": list(sys.version_info[:3]), "executable": sys.executable,
                "fork_parent_pid": self.fork_server.pid if self.fork_server else None}

    @expose(AllowParents())
    @arg_spec({"hop": dict, "name": str})
    def start_hop(self, hop: Dict[str, Any], name: str) -> Dict[str, Any]:
        """Start a chained agent as ``hop`` describes (see :mod:`connect`:
        e.g. a become command made on the controller); returns its id, pid
        and ``executable`` (its ``sys.executable``, None if unknown)."""
        from .connect import start_hop
        ctx, pid = start_hop(self.router, hop, name, extra_modules=_extra_modules())
        return {"id": ctx.context_id, "pid": pid,
                "executable": getattr(ctx, "executable", None)}

    @expose(AllowParents())
    @arg_spec({"name": str, "detach": bool})
    def fork_child(self, name: str = "fork", detach: bool = False) -> Dict[str, int]:
        """Fork a child from the virgin fork parent; returns its id and pid."""
        if self.fork_server is None:
            raise RuntimeError("%s has no fork parent" % self.router.name)
        ids = self.router.allocate(leaf=True)
        mine, theirs = socket.socketpair()
        req = {"id_lo": ids.lo, "id_hi": ids.hi, "parent_id": self.router.my_id,
               "name": name, "detach": detach,
               "max_body": self.config.get("max_body", DEFAULT_MAX_BODY),
               "log_level": self.config.get("log_level", logging.WARNING)}
        try:
            pid = self.fork_server.fork(req, theirs.fileno())
        finally:
            theirs.close()
        fd = mine.detach()
        stream = Stream(self.router.broker, FdTransport(fd, fd), "%s.%s" % (self.router.name, name),
                        self.router.max_body)
        self.router.attach_child(stream, ids, name)
        return {"id": ids.lo, "pid": pid}

    @expose(AllowParents())
    @arg_spec({"modules": dict})
    def add_modules(self, modules: Dict[str, Any]) -> List[str]:
        """Ship extra modules (name -> [is_package, source]) so their
        functions can be called here; returns the names added."""
        sources = bootstrap.own_sources()
        if sources is None:
            raise RuntimeError("not running from a bundle")
        added = []
        for name, (is_pkg, src) in sorted(modules.items()):
            if not isinstance(src, str) or name in bootstrap.SHIPPED_MODULES:
                continue
            sources[name] = (bool(is_pkg), src)
            added.append(name)
        return added


def _extra_modules() -> List[str]:
    """Modules shipped to us beyond the runtime: chained agents get them too."""
    sources = bootstrap.own_sources() or {}
    return sorted(n for n in sources if n not in bootstrap.SHIPPED_MODULES)


def _may_call(module: str) -> bool:
    sources = bootstrap.own_sources()
    return sources is not None and module in sources


def _setup_logging(name: str, level: int) -> None:
    root = logging.getLogger("ansible_mitogen_svc")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s " + name + "[%(process)d] %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
    root.setLevel(level)


def _obey_shutdown(router: Router) -> None:
    """A shutdown message from the parent side stops the broker. Installed
    before the parent stream is attached: the parent may send it as soon as
    the context answers, before the main thread gets to run again."""
    def on_shutdown(msg: Message, caller: Caller) -> None:
        if caller.relation != "child":
            router.broker.shutdown()

    router.add_handler(on_shutdown, handle=HANDLE_SHUTDOWN)


def _serve_until_parent_lost(router: Router, pool: Pool) -> None:
    while not router.broker.wait_stopped(1.0):
        pass
    pool.stop(timeout=2.0)
    router.broker.join(5.0)


def _make_router(cfg: Dict[str, Any]) -> Router:
    name = str(cfg.get("name", "agent"))
    max_body = int(cfg.get("max_body", DEFAULT_MAX_BODY))
    broker = Broker(name + ".broker").start()
    router = Router(broker, IdRange(int(cfg["id_lo"]), int(cfg["id_hi"])), name=name,
                    max_body=max_body)
    # Set before the parent stream exists: it may close at once.
    router.on_parent_lost = broker.shutdown
    return router


def _attach_parent(router: Router, fd_in: int, fd_out: int, cfg: Dict[str, Any]) -> None:
    # Only once the Pool has registered its handles: a forked child's
    # parent may send it a call as soon as fork_child() has returned.
    stream = Stream(router.broker, FdTransport(fd_in, fd_out), router.name + ".parent",
                    router.max_body)
    router.attach_parent(stream, int(cfg["parent_id"]))


def _undo_locale_coercion() -> None:
    """Fill :data:`COERCED_LOCALE`: an ``LC_CTYPE`` this process has but was
    not started with (its initial environment, on Linux) came from the
    coercion. Elsewhere nothing can tell, and it stays."""
    value = os.environ.get("LC_CTYPE")
    if value is None:
        return
    try:
        with open("/proc/self/environ", "rb") as fp:
            initial = fp.read().split(b"\0")
    except OSError:
        return
    if not any(item.startswith(b"LC_CTYPE=") for item in initial):
        COERCED_LOCALE["LC_CTYPE"] = value
        del os.environ["LC_CTYPE"]


def main(config_bytes: bytes, data_fd: int = 0) -> None:
    """Agent entry point (bootstrap stage 2 calls it). Frames travel on
    stdin/stdout, or both ways on stdout (``data_fd`` 1: a socket)."""
    _undo_locale_coercion()
    cfg = codec.loads(config_bytes)
    _setup_logging(str(cfg.get("name", "agent")), int(cfg.get("log_level", logging.WARNING)))
    fd_in = os.dup(data_fd)
    fd_out = os.dup(1) if data_fd == 0 else fd_in
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)  # stray prints must never corrupt the frame stream
    os.close(null)
    fork_server = (forkserver.start(child_main, close_fds=tuple({fd_in, fd_out}))
                   if cfg.get("fork", True) else None)
    _process["fork_server"] = fork_server
    router = _make_router(cfg)
    pool = Pool(router, [AgentService(router, fork_server, cfg)], size=POOL_SIZE,
                function_modules=_may_call)
    _obey_shutdown(router)
    _attach_parent(router, fd_in, fd_out, cfg)
    os.write(fd_out, bootstrap.ready_line(os.getpid(), sys.executable))
    try:
        _serve_until_parent_lost(router, pool)
    finally:
        if fork_server is not None:
            fork_server.close()
        _run_exit_hooks()
        logging.shutdown()
        os._exit(0)


def child_main(fd: int, cfg: Dict[str, Any]) -> None:
    """Entry point of a child forked by the fork parent: a child agent, or
    ``cfg["entry"]`` ("module:function" of a shipped module, e.g. the
    module zygote) called with the fd and the request."""
    entry = cfg.get("entry")
    if entry:
        module, _, function = str(entry).partition(":")
        if not _may_call(module):
            raise RuntimeError("%s is not a shipped module" % module)
        import importlib
        getattr(importlib.import_module(module), function)(fd, cfg)
        return
    _setup_logging(str(cfg.get("name", "child")), int(cfg.get("log_level", logging.WARNING)))
    router = _make_router(cfg)
    pool = Pool(router, [AgentService(router, None, cfg)], size=4, function_modules=_may_call)
    _obey_shutdown(router)
    _attach_parent(router, fd, fd, cfg)
    _serve_until_parent_lost(router, pool)
