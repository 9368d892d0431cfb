"""Start an agent process and run the bootstrap handshake.

Runs on: controller and targets (shipped: agents start chained agents).
Like :mod:`transport`, this module touches fds, but only until the
handshake is done; then the broker owns them.

Data travels over a socketpair: the child's stdin and stdout, or, with
``tty_stdin`` (chained agents), only its stdout, which the first stage then
reads too. Its stderr is a pipe, or, with ``use_tty``, the slave side of a
pty that is also its controlling terminal (and, with ``tty_stdin``, its
stdin), so ssh, sudo (even ``sudo -S``, which reads stdin), su and doas
prompt there. A :class:`Dialog` watches that output, types the password
once and recognises a wrong or missing one.
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
from functools import partial
from typing import Optional, Sequence, Tuple

from . import bootstrap
from .errors import BootstrapError, PasswordError

__all__ = ["start_agent", "Dialog", "prompt_pattern", "DEFAULT_CONNECT_TIMEOUT",
           "PASSWORD_PROMPT"]

LOG = logging.getLogger("ansible_mitogen_svc.spawn")

DEFAULT_CONNECT_TIMEOUT = 30.0
# sudo/su/doas/ssh prompts all end in "password:" (any case, any prefix).
PASSWORD_PROMPT = r"(?i)(password|passphrase)[^:\n]*:\s*$"
# Keep at most this much pre-READY output to explain a failure.
MAX_DIAG = 64 * 1024
#: A command on a pty (``ssh -tt``, a module run as vanilla runs it from a
#: file) is done when it exits, as sshd ends such a session, even if
#: processes it left behind still hold the pty: their output is read until
#: PTY_LINGER seconds of silence, for at most PTY_LINGER_MAX seconds.
PTY_LINGER = 0.05
PTY_LINGER_MAX = 0.5


def acquire_tty(fd: int) -> None:
    """In a new session's leader (after setsid): make the pty on ``fd``
    its controlling terminal."""
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)


def pty_linger(deadline: float) -> Tuple[float, float]:
    """While the output of a command that exited is read from its pty:
    ``(deadline, select timeout)``, from the deadline so far (0.0 at first).
    Reading stops at a timeout with nothing read, or at the deadline."""
    now = time.monotonic()
    deadline = deadline or now + PTY_LINGER_MAX
    return deadline, min(PTY_LINGER, max(0.0, deadline - now))


def prompt_containing(text: str) -> str:
    """A pattern matching output whose last line contains ``text`` (as
    Ansible's askpass and ``sshpass -P`` look for their prompt)."""
    return r"%s[^\n]*\Z" % re.escape(text)


def prompt_pattern(prompt: Optional[str]) -> str:
    """The default prompt pattern, or one that also matches ``prompt``
    literally (e.g. the text given to ``sudo -p``) at the end of output."""
    if not prompt:
        return PASSWORD_PROMPT
    return r"(?i)(?:(?:password|passphrase)[^:\n]*:|%s)\s*$" % re.escape(prompt.strip())


class Dialog:
    """When to type the password into a starting agent's pty, and which
    output means it was wrong or missing. Sans-IO: :meth:`feed` takes what
    the pty said and returns what to type, or raises PasswordError with
    vanilla Ansible's wording ("Incorrect sudo password").

    Args:
        label: the tool named in errors (``sudo``, ``su``, ``ssh``...).
        password: None when none was given.
        prompt: regex source searched in the output since the last answer;
            it should match only at the end (``\\s*$``). Default: anything
            ending in "password:".
        incorrect, missing: texts meaning a wrong / a required password.
        explain: "Incorrect" errors go on with what the tool said after
            the password was typed ("Incorrect ssh password: Permission
            denied, please try again.").
        decline: regex source of prompts that get an empty answer, as an
            askpass program that does not know the prompt gives (Ansible's
            ``sshpass_prompt``: only its prompt gets the password).
    """

    def __init__(self, label: str, password: Optional[str] = None,
                 prompt: Optional[str] = None, incorrect: Sequence[str] = (),
                 missing: Sequence[str] = (), explain: bool = False,
                 decline: Optional[str] = None) -> None:
        self.label = label
        self.password = password
        self.prompt = re.compile(prompt or PASSWORD_PROMPT)
        self.decline = re.compile(decline) if decline else None
        #: The pattern of the prompt answered last (its line is dropped
        #: from diagnostics).
        self.answered_prompt = self.prompt
        self.incorrect = [t for t in incorrect if t]
        self.missing = [t for t in missing if t]
        self.explain = explain
        self.answered = False
        self._seen = bytearray()  # since the last answer

    def _fail(self, what: str, said: str = "") -> PasswordError:
        if self.explain:  # what the tool said, not the new prompt's line
            said = said[:_prompt_line(said, self.prompt)].strip()
        else:
            said = ""
        return PasswordError("%s %s password%s" % (what, self.label, ": " + said if said else ""))

    def _check(self, text: str) -> None:
        if any(t in text for t in self.missing):
            raise self._fail("Missing")
        if self.answered and any(t in text for t in self.incorrect):
            raise self._fail("Incorrect", text)

    def feed(self, data: bytes) -> bytes:
        """The pty said ``data``; returns the bytes to type (may be b"")."""
        self._seen += data
        del self._seen[:-MAX_DIAG]
        text = self._seen.decode("utf-8", "replace")
        self._check(text)
        if not self.prompt.search(text):
            if self.decline is not None and self.decline.search(text):
                del self._seen[:]
                self.answered_prompt = self.decline
                return b"\n"
            return b""
        self.answered_prompt = self.prompt
        if self.answered:
            raise self._fail("Incorrect", text)  # prompted again
        if self.password is None:
            raise self._fail("Missing")
        self.answered = True
        del self._seen[:]
        return self.password.encode("utf-8") + b"\n"

    def exited(self, more: bytes, out: bytes) -> None:
        """The process ended before READY: ``more`` is the pty's last
        output, ``out`` its stdout. Raises PasswordError when they say why."""
        self._check((bytes(self._seen) + more + b"\n" + out).decode("utf-8", "replace"))


class Spawned:
    """A started child: its data socket, diagnostic fd and process."""

    def __init__(self, proc: subprocess.Popen, data: socket.socket, diag_fd: int) -> None:
        self.proc = proc
        self.data = data
        self.diag_fd = diag_fd
        self.agent_pid = 0
        self.agent_executable: Optional[str] = None
        self.leftover = b""


def _start(argv: Sequence[str], use_tty: bool, tty_stdin: bool, env: Optional[dict]) -> Spawned:
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
        proc = subprocess.Popen(list(argv), stdin=err_target if tty_stdin else child.fileno(),
                                stdout=child.fileno(), stderr=err_target, close_fds=True,
                                start_new_session=True,
                                preexec_fn=partial(acquire_tty, 2) if use_tty else None, env=env)
    except OSError as exc:
        parent.close()
        os.close(diag_fd)
        raise BootstrapError("cannot run %r: %s" % (argv[0], exc)) from exc
    finally:
        child.close()
        os.close(err_target)
    return Spawned(proc, parent, diag_fd)


def _handshake(sp: Spawned, payload: bytes, name: str, dialog: Optional[Dialog],
               timeout: float) -> None:
    deadline = time.monotonic() + timeout
    out = bytearray()
    diag = bytearray()
    sent = 0
    data_fd = sp.data.fileno()
    os.set_blocking(data_fd, False)
    os.set_blocking(sp.diag_fd, False)
    diag_open = True
    secret = dialog.password if dialog is not None else None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BootstrapError("%s: no handshake within %.1fs; output: %s"
                                 % (name, timeout, _show(diag, out, secret)))
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
            if chunk == b"":
                diag_open = False
            elif chunk:
                if len(diag) < MAX_DIAG:
                    diag += chunk
                answer = dialog.feed(chunk) if dialog is not None else b""
                if answer:
                    os.write(sp.diag_fd, answer)
                    _drop_prompt(diag, dialog.answered_prompt)  # type: ignore[union-attr]
        if data_fd in r:
            chunk = _read(data_fd)
            if chunk is None:
                continue
            if not chunk:
                more = bytearray()
                _drain(sp.diag_fd, more)
                diag += more
                if dialog is not None:
                    dialog.exited(bytes(more), bytes(out))
                code = _wait(sp.proc)
                raise BootstrapError("%s: process exited (status %s) before the handshake; "
                                     "output: %s" % (name, code, _show(diag, out, secret)))
            out += chunk
            i = out.find(bootstrap.READY)
            if i >= 0:
                j = out.find(b"\n", i)
                if j > 0:
                    sp.agent_pid, sp.agent_executable = bootstrap.parse_ready(
                        bytes(out[i + len(bootstrap.READY):j]))
                    sp.leftover = bytes(out[j + 1:])
                    return
            if len(out) > MAX_DIAG:
                raise BootstrapError("%s: %d bytes of output without a handshake: %s"
                                     % (name, len(out), _show(diag, out, secret)))


def _prompt_line(text: str, prompt: "re.Pattern[str]") -> int:
    """Where the line of the prompt ending ``text`` starts (``len(text)``
    when no prompt ends it)."""
    m = prompt.search(text)
    return len(text) if m is None else text.rfind("\n", 0, m.start()) + 1


def _drop_prompt(diag: bytearray, prompt: "re.Pattern[str]") -> None:
    """Forget the line of a prompt just answered: it is not the tool's
    output (Ansible's ssh_askpass never shows ssh's prompt either)."""
    tail = bytes(diag[-4096:]).decode("latin-1")  # byte offsets = char offsets
    del diag[len(diag) - len(tail) + _prompt_line(tail, prompt):]


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


#: Characters of that output an error shows at most (its end): enough for
#: what ``ssh -vvv`` says while it fails to log in.
SHOW_DIAG = 16000


def _show(diag: "bytes | bytearray", out: "bytes | bytearray", secret: Optional[str]) -> str:
    text = (bytes(diag) + bytes(out)).decode("utf-8", "replace").strip()[-SHOW_DIAG:]
    if secret:
        text = text.replace(secret, "********")
    return repr(text) if text else "(none)"


def start_agent(argv: Sequence[str], config: dict, name: str, dialog: Optional[Dialog] = None,
                use_tty: bool = False, tty_stdin: bool = False,
                timeout: float = DEFAULT_CONNECT_TIMEOUT, extra_modules: Sequence[str] = (),
                env: Optional[dict] = None) -> Spawned:
    """Run ``argv`` (which ends in the first stage, reading from fd 1 when
    ``tty_stdin`` else fd 0) and bootstrap the agent it starts.

    Args:
        config: the agent config (ids, parent id, name, ...).
        dialog: answers password prompts on the pty (needs ``use_tty``).
        use_tty: stderr is a pty, the controlling terminal.
        tty_stdin: stdin is that pty too; the data socket is stdout only.
    Returns:
        A :class:`Spawned` whose socket now carries frames.
    Raises:
        BootstrapError: the command failed, timed out or never answered.
        PasswordError: a password was needed and missing or wrong.
    """
    LOG.debug("%s: starting %s", name, argv[0])
    sp = _start(argv, use_tty, tty_stdin and use_tty, env)
    try:
        # Built (once per process) while the command starts: ssh's connect.
        blob, _sources = bootstrap.stage2(extra_modules)
        _handshake(sp, bootstrap.encode_stage2(blob) + bootstrap.encode_config(config), name,
                   dialog, timeout)
    except BaseException:
        sp.data.close()
        os.close(sp.diag_fd)  # a pty's close hangs up the session
        try:
            if sp.proc.poll() is None:
                sp.proc.kill()
        except OSError:
            pass  # e.g. a setuid sudo we may not signal
        _wait(sp.proc)
        raise
    return sp
