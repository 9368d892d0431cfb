"""Start agents: local, over ssh, chained through an agent, forked.

Runs on: controller and targets (shipped: agents start chained agents).

A chained agent is described by a *hop*, a dict of builtin values, so a
controller that knows nothing of the target (an Ansible become plugin) can
describe it, and the agent that starts it needs no other input:

========== ================ ===================================================
field      type             meaning
========== ================ ===================================================
command    str or None      shell command run as ``/bin/sh -c <command>``; it
                            must end up running :func:`bootstrap.agent_command`
                            (e.g. made by ``become.build_become_command``).
                            None: same user, just ``python``.
python     str              the new agent's interpreter
password   str or None      typed once at the prompt; never logged or shown
prompt     str or None      regex source matching the password prompt at the
                            end of the pty output (default: ends in
                            "password:")
success    str or None      marker the command prints before the agent starts
                            (e.g. ``BECOME-SUCCESS-...``); expected, ignored
incorrect  list of str      texts meaning a wrong password
missing    list of str      texts meaning a password was required
name       str              the tool, named in errors: "Incorrect <name>
                            password", "Missing <name> password"
timeout    int or float     seconds until READY, else BootstrapError with the
                            output
key        any builtin      optional: what identifies the hop for reuse (see
                            mux.ConnectionService); ignored here
========== ================ ===================================================
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import bootstrap
from .broker import Stream
from .context import Context, Router
from .spawn import (DEFAULT_CONNECT_TIMEOUT, PASSWORD_PROMPT, Dialog, prompt_containing,
                    prompt_pattern, start_agent)
from .transport import FdTransport

__all__ = ["local", "ssh", "via", "hop", "fork", "start_child_agent", "start_hop",
           "check_hop", "HOP_FIELDS"]

LOG = logging.getLogger("ansible_mitogen_svc.connect")
AGENT = "ansible_mitogen_svc.agent.AgentService"

_STR_OR_NONE = (str, type(None))
#: Hop field -> accepted types (see the module docstring).
HOP_FIELDS: Dict[str, Any] = {
    "command": _STR_OR_NONE, "python": str, "password": _STR_OR_NONE,
    "prompt": _STR_OR_NONE, "success": _STR_OR_NONE, "incorrect": (list, tuple),
    "missing": (list, tuple), "name": str, "timeout": (int, float), "key": object}
#: What sudo, su and doas print for a wrong password (for :func:`via`).
FAILURE_TEXTS = ["Sorry, try again", "Authentication failure", "incorrect password"]


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


def start_child_agent(router: Router, argv: Sequence[str], name: str,
                      dialog: Optional[Dialog] = None, use_tty: bool = False,
                      tty_stdin: bool = False, timeout: float = DEFAULT_CONNECT_TIMEOUT,
                      extra_modules: Sequence[str] = (), fork: bool = True
                      ) -> Tuple[Context, int]:
    """Run ``argv`` (ending in the first stage) as a child of ``router``'s
    context; returns its Context and pid. See :func:`spawn.start_agent`."""
    ids = router.allocate(leaf=False)
    config = {"id_lo": ids.lo, "id_hi": ids.hi, "parent_id": router.my_id, "name": name,
              "max_body": router.max_body, "fork": fork,
              "log_level": logging.getLogger("ansible_mitogen_svc").getEffectiveLevel()}
    sp = start_agent(argv, config, name, dialog=dialog, use_tty=use_tty, tty_stdin=tty_stdin,
                     timeout=timeout, extra_modules=extra_modules)
    fd = sp.data.detach()
    stream = Stream(router.broker, FdTransport(fd, fd, proc=sp.proc), name, router.max_body)
    if sp.leftover:
        stream.reader.receive_data(sp.leftover)
    diag = Stream(router.broker, FdTransport(sp.diag_fd, sp.diag_fd), name + ".stderr")
    diag.raw_sink = _log_sink(name)
    router.broker.add_stream(diag)
    ctx = router.attach_child(stream, ids, name)
    ctx.executable = sp.agent_executable  # type: ignore[attr-defined]
    return ctx, sp.agent_pid


def local(router: Router, python: Optional[str] = None, name: Optional[str] = None,
          extra_modules: Sequence[str] = (), timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Context:
    """Start an agent on this machine with ``python`` (default: ours)."""
    argv = bootstrap.first_stage_argv(python or sys.executable)
    ctx, pid = start_child_agent(router, argv, name or "local", timeout=timeout,
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
        ssh_path: str = "ssh", single_prompt: bool = False,
        prompt: Optional[str] = None) -> Context:
    """Start an agent on ``hostname`` through the OpenSSH client.

    With ``password``, ssh prompts on a pty and the password is typed there.
    A wrong one raises PasswordError ("Incorrect ssh password: <what ssh
    said>") when ssh prompts again; with ``single_prompt``, ssh is told to
    prompt once (``NumberOfPasswordPrompts=1``) and then fails by itself
    (status 255, "Permission denied (...)": a BootstrapError holding its
    output), as Ansible's ``ssh_askpass`` password mechanism does. With
    ``prompt``, only a prompt whose line contains that text gets the
    password; ssh's other password prompts get an empty answer (as from an
    askpass that does not know them)."""
    if password is not None and single_prompt:  # after ssh_args: theirs win (ssh takes the first)
        ssh_args = list(ssh_args) + ["-o", "NumberOfPasswordPrompts=1"]
    argv = ssh_argv(hostname, username, port, identity_file, ssh_args, ssh_path,
                    batch=password is None)
    argv.append(" ".join(shlex.quote(a) for a in bootstrap.first_stage_argv(python)))
    # Without single_prompt, a wrong password is one ssh asks for again
    # (sshpass's status 5); a refused login otherwise (a smart card's wrong
    # PIN) is ssh's own failure.
    retry = ["Permission denied, please try again"]
    dialog = (Dialog("ssh", password, incorrect=[] if single_prompt else retry,
                     explain=True, prompt=prompt_containing(prompt) if prompt else None,
                     decline=PASSWORD_PROMPT if prompt else None)
              if password is not None else None)
    ctx, pid = start_child_agent(router, argv, name or "ssh.%s" % hostname, dialog=dialog,
                                 use_tty=dialog is not None, timeout=timeout,
                                 extra_modules=extra_modules)
    ctx.pid = pid  # type: ignore[attr-defined]
    return ctx


def check_hop(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Returns ``spec`` if it is a valid hop. Raises TypeError naming the
    field (never its value: it may be the password)."""
    for field, value in spec.items():
        if not isinstance(value, HOP_FIELDS.get(field, ())):
            raise TypeError("bad hop field %r (%s)" % (field, type(value).__name__))
    if not spec.get("python"):
        raise TypeError("a hop needs 'python'")
    return spec


def start_hop(router: Router, spec: Dict[str, Any], name: str,
              extra_modules: Sequence[str] = ()) -> Tuple[Context, int]:
    """Start the chained agent ``spec`` describes as a child of ``router``'s
    context (AgentService.start_hop runs this); returns its Context and pid.

    Raises:
        BootstrapError: it did not start (the message holds its output).
        PasswordError: "Incorrect/Missing <name> password".
    """
    check_hop(spec)
    timeout = float(spec.get("timeout") or DEFAULT_CONNECT_TIMEOUT)
    command = spec.get("command")
    if command is None:
        return start_child_agent(router, bootstrap.first_stage_argv(spec["python"]), name,
                                 timeout=timeout, extra_modules=extra_modules)
    dialog = Dialog(spec.get("name") or "become", spec.get("password"), spec.get("prompt"),
                    spec.get("incorrect") or (), spec.get("missing") or ())
    return start_child_agent(router, ["/bin/sh", "-c", command], name, dialog=dialog,
                             use_tty=True, tty_stdin=True, timeout=timeout,
                             extra_modules=extra_modules)


def hop(parent: Context, spec: Dict[str, Any], name: Optional[str] = None) -> Context:
    """Ask the agent ``parent`` to start the chained agent ``spec``
    describes (see the module docstring). Errors arrive as CallError
    carrying the remote BootstrapError/PasswordError."""
    name = name or "%s.%s" % (parent.name, spec.get("name") or "python")
    timeout = float(spec.get("timeout") or DEFAULT_CONNECT_TIMEOUT)
    reply = parent.call_service_async(AGENT, "start_hop", hop=dict(spec),
                                      name=name).get(timeout + 5)
    ctx = parent.router.context(int(reply["id"]), name)
    ctx.pid = reply["pid"]  # type: ignore[attr-defined]
    ctx.executable = reply.get("executable")  # type: ignore[attr-defined]
    return ctx


def via(parent: Context, prefix: Sequence[str], python: str = "python3",
        password: Optional[str] = None, name: Optional[str] = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        password_prompt: Optional[str] = None) -> Context:
    """Ask the agent ``parent`` to start a chained agent with ``prefix``
    (e.g. ``["sudo", "-u", "alice", "--"]``); password prompts are answered
    through a pty. Prompts ending in "password:" are recognised; pass
    ``password_prompt`` for any other (e.g. the text given to ``sudo -p``)."""
    tool = os.path.basename(prefix[0]) if prefix else "chain"
    command = " ".join(shlex.quote(a) for a in prefix) + " " + bootstrap.agent_command(python)
    spec = {"command": command, "python": python, "password": password,
            "prompt": prompt_pattern(password_prompt), "incorrect": FAILURE_TEXTS,
            "missing": [], "name": tool, "timeout": float(timeout)}
    return hop(parent, spec, name or "%s.%s" % (parent.name, tool))


def fork(parent: Context, name: str = "fork", detach: bool = False) -> Context:
    """Fork a child of ``parent``'s virgin fork parent."""
    reply = parent.call_service_async(AGENT, "fork_child", name=name,
                                      detach=detach).get(60.0)
    ctx = parent.router.context(int(reply["id"]), "%s.%s" % (parent.name, name))
    ctx.pid = reply["pid"]  # type: ignore[attr-defined]
    return ctx
