"""Target-side functions for the Ansible connection plugins.

Runs on: targets (shipped to every agent the mux starts, through
``extra_modules``). Only parents (the mux and the controller's workers above
it) may call these functions; see :mod:`ansible_mitogen_svc.service`.

What vanilla Ansible does over ssh, done by the persistent agent instead:

* :func:`run_command` is ``ssh host CMD``: the login shell runs ``CMD`` with
  ``in_data`` on stdin, optionally on a pty (``ssh -tt``), and rc, stdout and
  stderr come back as bytes.
* :func:`write_file` / :func:`pull_file` replace ``sftp put`` (inline bytes
  for small files, streamed from the mux's FileService for big ones).
* :func:`read_chunk` replaces ``sftp get``, one bounded chunk per call.
"""
from __future__ import annotations

import errno
import os
import pty
import pwd
import select
import subprocess
from functools import partial
from typing import Any, Dict, List, Optional

from .spawn import acquire_tty, pty_linger

__all__ = ["run_command", "write_file", "pull_file", "read_chunk", "login_shell",
           "expand_user", "make_temp_dir", "remove_tree", "chmod",
           "MAX_CHUNK"]

# Largest chunk read_chunk() returns: far below the 64 MiB frame limit and
# big enough that a 100 MiB fetch takes 25 round trips.
MAX_CHUNK = 4 * 1024 * 1024


def login_shell() -> str:
    """The shell sshd would run a command with: the user's login shell."""
    try:
        shell = pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        shell = ""
    return shell or "/bin/sh"


def run_command(argv: List[str], in_data: Optional[bytes] = None,
                use_pty: bool = False, term: Optional[str] = None,
                stdin_pipe: bool = False) -> Dict[str, Any]:
    """Run ``argv`` and return ``{"rc", "stdout", "stderr"}`` (bytes).

    Args:
        argv: e.g. ``[login_shell(), "-c", cmd]``.
        in_data: written to stdin, which is then closed; None closes stdin
            at once.
        use_pty: run on a new pty that is also the controlling terminal
            (like ``ssh -tt``): stdout and stderr arrive merged on stdout
            with CRLF line ends, stderr is empty. As sshd does for a
            session with a pty, ``SSH_TTY`` names it and ``TERM`` is
            ``term`` (the terminal type the client would send), if given.
        stdin_pipe: with ``use_pty``, stdin is a pipe that gets
            ``in_data`` all the same (a pipelined module whose output
            vanilla reads through ``ssh -tt`` from a module file).
    Raises:
        OSError: the program cannot be started.
    """
    if use_pty:
        return _run_on_pty(argv, in_data, term, stdin_pipe)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
    stdout, stderr = proc.communicate(in_data or b"")
    return {"rc": proc.returncode, "stdout": stdout, "stderr": stderr}


def _run_on_pty(argv: List[str], in_data: Optional[bytes],
                term: Optional[str] = None, stdin_pipe: bool = False) -> Dict[str, Any]:
    master, slave = pty.openpty()
    env = dict(os.environ, SSH_TTY=os.ttyname(slave))
    if term:
        env["TERM"] = term
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_pipe else slave,
                                stdout=slave, stderr=slave, close_fds=True,
                                start_new_session=True, preexec_fn=partial(acquire_tty, 1),
                                env=env)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    out = bytearray()
    pending = memoryview(in_data or b"")
    sink = master
    if proc.stdin is not None:
        sink = proc.stdin.fileno()
        os.set_blocking(sink, False)
        if not pending:
            proc.stdin.close()
    until = 0.0
    try:
        while True:
            wait = 1.0
            if proc.poll() is not None:  # done, as sshd sees it
                until, wait = pty_linger(until)
            wl = [sink] if pending else []
            r, w, _ = select.select([master], wl, [], wait)
            if until and (not r or wait == 0.0):
                break
            if w:
                try:
                    n = os.write(sink, pending[:4096 if sink == master else 65536])
                except BrokenPipeError:  # it stopped reading: as ssh, drop the rest
                    n = len(pending)
                pending = pending[n:]
                if not pending and proc.stdin is not None:
                    proc.stdin.close()
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError as exc:
                    if exc.errno != errno.EIO:  # EIO: every slave fd closed
                        raise
                    chunk = b""
                if not chunk:
                    break
                out += chunk
    finally:
        os.close(master)
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
    return {"rc": proc.wait(), "stdout": bytes(out), "stderr": b""}


def write_file(path: str, data: bytes, mode: int = 0o666) -> int:
    """Create or truncate ``path`` and write ``data``; returns the byte
    count. A new file gets ``mode & ~umask``, as sftp gives it the mode of
    the file it copies."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fp:
        fp.write(data)
    return len(data)


def pull_file(source: str, path: str, timeout: float = 300.0, mode: int = 0o666) -> int:
    """Stream ``source`` (registered with the FileService of our parent,
    the mux) into ``path`` (created with ``mode & ~umask``); returns its size."""
    from .files import get_file
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode))
    from .service import current_call
    parent = current_call().parent
    if parent is None:
        raise RuntimeError("pull_file() needs a parent context serving files")
    meta = get_file(parent, source, path, timeout=timeout)
    return int(meta["size"])


def read_chunk(path: str, offset: int, size: int) -> Dict[str, Any]:
    """Read up to ``min(size, MAX_CHUNK)`` bytes of ``path`` at ``offset``;
    returns ``{"data", "size"}`` where ``size`` is the file's size."""
    with open(path, "rb") as fp:
        fp.seek(offset)
        data = fp.read(max(0, min(int(size), MAX_CHUNK)))
        total = os.fstat(fp.fileno()).st_size
    return {"data": data, "size": total}


# -- action-layer helpers: what ActionBase otherwise runs shell commands for --

def expand_user(path: str) -> str:
    """``echo ~user`` without a shell: tilde expansion of one word."""
    return os.path.expanduser(path)


def make_temp_dir(tmpdir: str, basefile: str) -> str:
    """``( umask 77 && mkdir -p TMPDIR && mkdir TMPDIR/BASEFILE )`` without
    changing the (process-wide) umask: every directory made is 0700.
    Returns TMPDIR/BASEFILE/ with variables expanded as ``echo`` would."""
    tmpdir = os.path.expandvars(tmpdir)
    missing = []
    head = os.path.abspath(tmpdir)
    while not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    path = os.path.join(tmpdir, basefile)
    os.mkdir(path, 0o700)
    return os.path.join(path, "")


def remove_tree(path: str) -> None:
    """``rm -f -r PATH``."""
    import shutil
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


_WHO = {"u": 0o4700, "g": 0o2070, "o": 0o0007}
_PERM = {"r": 0o444, "w": 0o222, "x": 0o111, "s": 0o6000}


def _apply_mode(mode: str, current: int, is_dir: bool) -> Optional[int]:
    """The mode ``chmod MODE`` gives a file of mode ``current``; None for
    forms this does not handle (no ``who``, copies like ``g=u``)."""
    if mode.isdigit():
        return int(mode, 8)
    new = current
    for clause in mode.split(","):
        i = 0
        who = 0
        while i < len(clause) and clause[i] in "ugoa":
            who |= 0o7777 if clause[i] == "a" else _WHO[clause[i]]
            i += 1
        if not who or i == len(clause):
            return None
        while i < len(clause):
            op = clause[i]
            if op not in "+-=":
                return None
            i += 1
            bits = 0
            while i < len(clause) and clause[i] not in "+-=":
                ch = clause[i]
                if ch == "X":
                    if is_dir or current & 0o111:
                        bits |= 0o111
                elif ch in _PERM:
                    bits |= _PERM[ch]
                else:
                    return None
                i += 1
            bits &= who
            if op == "+":
                new |= bits
            elif op == "-":
                new &= ~bits
            else:
                new = (new & ~(who & 0o777)) | bits
    return new


def chmod(paths: List[str], mode: str) -> bool:
    """``chmod MODE PATHS...``; False (nothing changed) when the mode is a
    form this does not handle or a path is missing: the caller then runs
    the real chmod, for its exact behaviour and error text."""
    import stat as stat_mod
    plan = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            return False
        new = _apply_mode(mode, stat_mod.S_IMODE(st.st_mode), stat_mod.S_ISDIR(st.st_mode))
        if new is None:
            return False
        plan.append((path, new))
    for path, new in plan:
        os.chmod(path, new)
    return True
