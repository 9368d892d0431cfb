"""Start an agent process and run the bootstrap handshake.

Runs on: controller and targets (shipped: agents start chained agents).
Like :mod:`transport`, this module touches fds, but only until the
handshake is done; then the broker owns them.

Data travels over a socketpair used as the child's stdin and stdout. Its
stderr is a pipe, or, when ``use_tty`` is set, the slave side of a pty that
is also its controlling terminal, so sudo, su, doas and ssh can prompt for a
password there. The password is written to the pty once; a second prompt
means it was wrong.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import select
import socket
import subprocess
import termios
import time
from typing import List, Optional, Sequence

from . import bootstrap
from .errors import BootstrapError, PasswordError

__all__ = ["start_agent", "DEFAULT_CONNECT_TIMEOUT", "PASSWORD_PROMPT"]

LOG = logging.getLogger("ansible_mitogen_svc.spawn")

DEFAULT_CONNECT_TIMEOUT = 30.0
# sudo/su/doas/ssh prompts all end in "password:" (any case, any prefix).
PASSWORD_PROMPT = re.compile(r"(?i)(password|passphrase)[^:\n]*:\s*$")
FAILURE_TEXT = re.compile(r"(?i)(sorry, try again|authentication failure|incorrect password"
                          r"|permission denied)")
# Keep at most this much pre-READY output to explain a failure.
MAX_DIAG = 64 * 1024


def _acquire_tty() -> None:
    # Runs in the child between fork and exec (start_new_session already
    # called setsid): make the pty on fd 2 the controlling terminal.
    fcntl.ioctl(2, termios.TIOCSCTTY, 0)


class Spawned:
    """A started child: its data socket, diagnostic fd and process."""

    def __init__(self, proc: subprocess.Popen, data: socket.socket, diag_fd: int,
                 use_tty: bool) -> None:
        self.proc = proc
        self.data = data
        self.diag_fd = diag_fd
        self.use_tty = use_tty
        self.agent_pid = 0
        self.leftover = b""


def _start(argv: Sequence[str], use_tty: bool, env: Optional[dict]) -> Spawned:
    parent, child = socket.socketpair()
    if use_tty:
        diag_fd, slave = os.openpty()
        try:
            attrs = termios.tcgetattr(slave)
            attrs[3] &= ~termios.ECHO  # never echo a typed password back
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
        except termios.error:
            pass
        err_target: int = slave
    else:
        diag_fd, err_target = os.pipe()
    try:
        proc = subprocess.Popen(list(argv), stdin=child.fileno(), stdout=child.fileno(),
                                stderr=err_target, close_fds=True, start_new_session=True,
                                preexec_fn=_acquire_tty if use_tty else None, env=env)
    except OSError as exc:
        parent.close()
        os.close(diag_fd)
        raise BootstrapError("cannot run %r: %s" % (argv[0], exc)) from exc
    finally:
        child.close()
        os.close(err_target)
    return Spawned(proc, parent, diag_fd, use_tty)


def prompt_pattern(prompt: Optional[str]) -> "re.Pattern[str]":
    """The default prompt pattern, or one that also matches ``prompt``
    literally (e.g. the text given to ``sudo -p``) at the end of output."""
    if not prompt:
        return PASSWORD_PROMPT
    return re.compile(r"(?i)(?:(?:password|passphrase)[^:\n]*:|%s)\s*$"
                      % re.escape(prompt.strip()))


def _handshake(sp: Spawned, payload: bytes, name: str, password: Optional[str],
               timeout: float, prompt_re: "re.Pattern[str]" = PASSWORD_PROMPT) -> None:
    deadline = time.monotonic() + timeout
    out = bytearray()
    diag = bytearray()
    sent = 0
    prompts = 0
    data_fd = sp.data.fileno()
    os.set_blocking(data_fd, False)
    os.set_blocking(sp.diag_fd, False)
    diag_open = True
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BootstrapError("%s: no handshake within %.1fs; output: %s"
                                 % (name, timeout, _show(diag, out)))
        rl = [data_fd] + ([sp.diag_fd] if diag_open else [])
        wl = [data_fd] if sent < len(payload) else []
        r, w, _ = select.select(rl, wl, [], min(left, 1.0))
        if w:
            try:
                sent += os.write(data_fd, payload[sent:sent + 65536])
            except BlockingIOError:
                pass
            except OSError:
                sent = len(payload)  # child gone; EOF on read explains why
        if sp.diag_fd in r:
            chunk = _read(sp.diag_fd)
            if chunk is None:
                chunk = b""
            elif not chunk:
                diag_open = False
            elif len(diag) < MAX_DIAG:
                diag += chunk
            text = diag.decode("utf-8", "replace")
            if prompt_re.search(text):
                prompts += 1
                diag.clear()
                if password is None:
                    raise PasswordError("%s: a password was requested but none was given" % name)
                if prompts > 1:
                    raise PasswordError("%s: incorrect password (prompted again)" % name)
                if not sp.use_tty:
                    raise PasswordError("%s: password prompt without a tty: %s"
                                        % (name, text.strip()[-200:]))
                os.write(sp.diag_fd, password.encode("utf-8") + b"\n")
        if data_fd in r:
            chunk = _read(data_fd)
            if chunk is None:
                continue
            if not chunk:
                _drain(sp.diag_fd, diag)
                code = _wait(sp.proc)
                msg = "%s: process exited (status %s) before the handshake; output: %s" % (
                    name, code, _show(diag, out))
                if prompts and FAILURE_TEXT.search(diag.decode("utf-8", "replace")):
                    raise PasswordError(msg)
                raise BootstrapError(msg)
            out += chunk
            i = out.find(bootstrap.READY)
            if i >= 0:
                j = out.find(b"\n", i)
                if j > 0:
                    sp.agent_pid = int(out[i + len(bootstrap.READY):j] or 0)
                    sp.leftover = bytes(out[j + 1:])
                    return
            if len(out) > MAX_DIAG:
                raise BootstrapError("%s: %d bytes of output without a handshake: %s"
                                     % (name, len(out), _show(diag, out)))


def _read(fd: int) -> Optional[bytes]:
    """Bytes available, b"" on EOF/error, None when nothing is ready."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _drain(fd: int, into: bytearray) -> None:
    end = time.monotonic() + 0.5
    while time.monotonic() < end and len(into) < MAX_DIAG:
        r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not r:
            return
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return
        if not chunk:
            return
        into += chunk


def _wait(proc: subprocess.Popen) -> Optional[int]:
    try:
        return proc.wait(2.0)
    except subprocess.TimeoutExpired:
        return None


def _show(diag: "bytes | bytearray", out: "bytes | bytearray") -> str:
    text = (bytes(diag) + bytes(out)).decode("utf-8", "replace").strip()
    return repr(text[-2000:]) if text else "(none)"


def start_agent(argv_prefix: Sequence[str], python: str, config: dict, name: str,
                password: Optional[str] = None, use_tty: bool = False,
                timeout: float = DEFAULT_CONNECT_TIMEOUT, extra_modules: Sequence[str] = (),
                shell_quote: bool = False, env: Optional[dict] = None,
                password_prompt: Optional[str] = None) -> Spawned:
    """Start ``argv_prefix + [python, -c, FIRST_STAGE]`` and bootstrap it.

    Args:
        argv_prefix: e.g. ``[]`` (local), ``["ssh", ..., "host"]``,
            ``["sudo", "-u", "alice", "--"]``.
        python: target interpreter path or name.
        config: the agent config (ids, parent id, name, ...).
        shell_quote: join the python command into one shell-quoted string
            (ssh passes its command to the remote shell).
        password_prompt: a prompt to answer besides the usual "...password:"
            ones, e.g. the text given to ``sudo -p``.
    Returns:
        A :class:`Spawned` whose socket now carries frames.
    Raises:
        BootstrapError: the command failed, timed out or never answered.
        PasswordError: a password was needed and missing or wrong.
    """
    import shlex
    blob, _sources = bootstrap.stage2(extra_modules)
    cmd: List[str] = bootstrap.first_stage_argv(python, len(blob))
    argv = list(argv_prefix) + ([" ".join(shlex.quote(a) for a in cmd)] if shell_quote else cmd)
    LOG.debug("%s: starting %s", name, " ".join(shlex.quote(a) for a in argv_prefix) or python)
    sp = _start(argv, use_tty, env)
    try:
        _handshake(sp, blob + bootstrap.encode_config(config), name, password, timeout,
                   prompt_pattern(password_prompt))
    except BaseException:
        sp.data.close()
        os.close(sp.diag_fd)
        if sp.proc.poll() is None:
            sp.proc.kill()
        _wait(sp.proc)
        raise
    return sp
