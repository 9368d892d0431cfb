"""Start agents: local, over ssh, chained through an agent, forked.

Runs on: controller and targets (shipped: agents start chained agents).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from .broker import Stream
from .context import Context, Router
from .spawn import DEFAULT_CONNECT_TIMEOUT, start_agent
from .transport import FdTransport

__all__ = ["local", "ssh", "via", "fork", "start_child_agent"]

LOG = logging.getLogger("ansible_mitogen_svc.connect")
AGENT = "ansible_mitogen_svc.agent.AgentService"


def _log_sink(name: str) -> Callable[[bytes], None]:
    log = logging.getLogger("ansible_mitogen_svc.remote")
    buf = bytearray()

    def sink(data: bytes) -> None:
        buf.extend(data)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            log.debug("%s: %s", name, line.decode("utf-8", "replace").rstrip("\r"))
        if len(buf) > 65536:
            del buf[:]
    return sink


def start_child_agent(router: Router, argv_prefix: Sequence[str], python: str, name: str,
                      password: Optional[str] = None, use_tty: bool = False,
                      timeout: float = DEFAULT_CONNECT_TIMEOUT, extra_modules: Sequence[str] = (),
                      shell_quote: bool = False, fork: bool = True,
                      password_prompt: Optional[str] = None) -> Tuple[Context, int]:
    """Start an agent as a child of ``router``'s context; returns its
    Context and pid. See :func:`spawn.start_agent` for errors."""
    ids = router.allocate(leaf=False)
    config = {"id_lo": ids.lo, "id_hi": ids.hi, "parent_id": router.my_id, "name": name,
              "max_body": router.max_body, "fork": fork,
              "log_level": logging.getLogger("ansible_mitogen_svc").getEffectiveLevel()}
    sp = start_agent(argv_prefix, python, config, name, password=password, use_tty=use_tty,
                     timeout=timeout, extra_modules=extra_modules, shell_quote=shell_quote,
                     password_prompt=password_prompt)
    fd = sp.data.detach()
    stream = Stream(router.broker, FdTransport(fd, fd, proc=sp.proc), name, router.max_body)
    if sp.leftover:
        stream.reader.receive_data(sp.leftover)
    diag = Stream(router.broker, FdTransport(sp.diag_fd, sp.diag_fd), name + ".stderr")
    diag.raw_sink = _log_sink(name)
    router.broker.add_stream(diag)
    ctx = router.attach_child(stream, ids, name)
    return ctx, sp.agent_pid


def local(router: Router, python: Optional[str] = None, name: Optional[str] = None,
          extra_modules: Sequence[str] = (), timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Context:
    """Start an agent on this machine with ``python`` (default: ours)."""
    python = python or sys.executable
    ctx, pid = start_child_agent(router, [], python, name or "local", timeout=timeout,
                                 extra_modules=extra_modules)
    ctx.pid = pid  # type: ignore[attr-defined]
    return ctx


def ssh_argv(hostname: str, username: Optional[str] = None, port: Optional[int] = None,
             identity_file: Optional[str] = None, ssh_args: Sequence[str] = (),
             ssh_path: str = "ssh", batch: bool = True) -> List[str]:
    argv = [ssh_path]
    if port:
        argv += ["-p", str(port)]
    if username:
        argv += ["-l", username]
    if identity_file:
        argv += ["-i", identity_file, "-o", "IdentitiesOnly=yes"]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    argv += list(ssh_args)
    argv += ["--", hostname]
    return argv


def ssh(router: Router, hostname: str, username: Optional[str] = None, port: Optional[int] = None,
        identity_file: Optional[str] = None, ssh_args: Sequence[str] = (),
        python: str = "python3", password: Optional[str] = None, name: Optional[str] = None,
        extra_modules: Sequence[str] = (), timeout: float = DEFAULT_CONNECT_TIMEOUT,
        ssh_path: str = "ssh") -> Context:
    """Start an agent on ``hostname`` through the OpenSSH client."""
    argv = ssh_argv(hostname, username, port, identity_file, ssh_args, ssh_path,
                    batch=password is None)
    ctx, pid = start_child_agent(router, argv, python, name or "ssh.%s" % hostname,
                                 password=password, use_tty=password is not None,
                                 timeout=timeout, extra_modules=extra_modules, shell_quote=True)
    ctx.pid = pid  # type: ignore[attr-defined]
    return ctx


def via(parent: Context, prefix: Sequence[str], python: str = "python3",
        password: Optional[str] = None, name: Optional[str] = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        password_prompt: Optional[str] = None) -> Context:
    """Ask the agent ``parent`` to start a chained agent with ``prefix``
    (e.g. ``["sudo", "-u", "alice", "--"]``); password prompts are answered
    through a pty. Prompts ending in "password:" are recognised; pass
    ``password_prompt`` for any other (e.g. the text given to ``sudo -p``)."""
    name = name or "%s.%s" % (parent.name, os.path.basename(prefix[0]) if prefix else "chain")
    reply = parent.call_service_async(AGENT, "start_agent", prefix=list(prefix), python=python,
                                      name=name, password=password, use_tty=True,
                                      timeout=float(timeout),
                                      password_prompt=password_prompt).get(timeout + 5)
    ctx = parent.router.context(int(reply["id"]), name)
    ctx.pid = reply["pid"]  # type: ignore[attr-defined]
    return ctx


def fork(parent: Context, name: str = "fork", detach: bool = False) -> Context:
    """Fork a child of ``parent``'s virgin fork parent."""
    reply = parent.call_service_async(AGENT, "fork_child", name=name,
                                      detach=detach).get(60.0)
    ctx = parent.router.context(int(reply["id"]), "%s.%s" % (parent.name, name))
    ctx.pid = reply["pid"]  # type: ignore[attr-defined]
    return ctx
