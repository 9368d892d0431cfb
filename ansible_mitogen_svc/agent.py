"""Remote entry points: the agent and its forked children.

Runs on: targets (shipped). ``main`` is called by bootstrap stage 2;
``child_main`` by the fork parent in a freshly forked child.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any, Dict, List, Optional

from . import bootstrap, codec, forkserver
from .broker import Broker, Stream
from .context import Router
from .policy import AllowAny, AllowParents, Caller
from .protocol import DEFAULT_MAX_BODY
from .router import IdRange
from .service import Pool, Service, arg_spec, expose
from .transport import FdTransport
from .wire import HANDLE_SHUTDOWN, Message

__all__ = ["AgentService", "main", "child_main"]

LOG = logging.getLogger("ansible_mitogen_svc.agent")

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
    @arg_spec({"prefix": list, "python": str, "name": str,
               "password": (str, type(None)), "use_tty": bool, "timeout": (int, float),
               "password_prompt": (str, type(None))})
    def start_agent(self, prefix: List[str], python: str, name: str,
                    password: Optional[str] = None, use_tty: bool = True,
                    timeout: float = 30.0,
                    password_prompt: Optional[str] = None) -> Dict[str, int]:
        """Start a chained agent with ``prefix + [python, -c, ...]``
        (e.g. ``["sudo", "-u", "alice", "--"]``); returns its id and pid."""
        from .connect import start_child_agent
        ctx, pid = start_child_agent(self.router, prefix, python, name, password=password,
                                     use_tty=use_tty, timeout=float(timeout),
                                     extra_modules=_extra_modules(),
                                     password_prompt=password_prompt)
        return {"id": ctx.context_id, "pid": pid}

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


def _serve_until_parent_lost(router: Router, pool: Pool) -> None:
    def on_shutdown(msg: Message, caller: Caller) -> None:
        if caller.relation != "child":
            router.broker.shutdown()

    router.add_handler(on_shutdown, handle=HANDLE_SHUTDOWN)
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


def main(config_bytes: bytes) -> None:
    """Agent entry point (bootstrap stage 2 calls it)."""
    cfg = codec.loads(config_bytes)
    _setup_logging(str(cfg.get("name", "agent")), int(cfg.get("log_level", logging.WARNING)))
    fd_in, fd_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)  # stray prints must never corrupt the frame stream
    os.close(null)
    fork_server = (forkserver.start(child_main, close_fds=(fd_in, fd_out))
                   if cfg.get("fork", True) else None)
    router = _make_router(cfg)
    pool = Pool(router, [AgentService(router, fork_server, cfg)], size=POOL_SIZE,
                function_modules=_may_call)
    _attach_parent(router, fd_in, fd_out, cfg)
    os.write(fd_out, bootstrap.READY + str(os.getpid()).encode() + b"\n")
    try:
        _serve_until_parent_lost(router, pool)
    finally:
        if fork_server is not None:
            fork_server.close()
        logging.shutdown()
        os._exit(0)


def child_main(fd: int, cfg: Dict[str, Any]) -> None:
    """Entry point of a child forked by the fork parent."""
    _setup_logging(str(cfg.get("name", "child")), int(cfg.get("log_level", logging.WARNING)))
    router = _make_router(cfg)
    pool = Pool(router, [AgentService(router, None, cfg)], size=4, function_modules=_may_call)
    _attach_parent(router, fd, fd, cfg)
    _serve_until_parent_lost(router, pool)
