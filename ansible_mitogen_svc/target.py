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
import termios
from typing import Any, Dict, List, Optional

__all__ = ["run_command", "write_file", "pull_file", "read_chunk", "login_shell",
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
                use_pty: bool = False) -> Dict[str, Any]:
    """Run ``argv`` and return ``{"rc", "stdout", "stderr"}`` (bytes).

    Args:
        argv: e.g. ``[login_shell(), "-c", cmd]``.
        in_data: written to stdin, which is then closed; None closes stdin
            at once.
        use_pty: run on a new pty that is also the controlling terminal
            (like ``ssh -tt``): stdout and stderr arrive merged on stdout
            with CRLF line ends, stderr is empty.
    Raises:
        OSError: the program cannot be started.
    """
    if use_pty:
        return _run_on_pty(argv, in_data)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
    stdout, stderr = proc.communicate(in_data or b"")
    return {"rc": proc.returncode, "stdout": stdout, "stderr": stderr}


def _make_controlling_tty() -> None:
    import fcntl
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _run_on_pty(argv: List[str], in_data: Optional[bytes]) -> Dict[str, Any]:
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                start_new_session=True, preexec_fn=_make_controlling_tty)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    out = bytearray()
    pending = memoryview(in_data or b"")
    try:
        while True:
            wl = [master] if pending else []
            r, w, _ = select.select([master], wl, [], 1.0)
            if w:
                n = os.write(master, pending[:4096])
                pending = pending[n:]
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
    return {"rc": proc.wait(), "stdout": bytes(out), "stderr": b""}


def write_file(path: str, data: bytes) -> int:
    """Create or truncate ``path`` (mode 0666 & ~umask, like sftp) and
    write ``data``; returns the byte count."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    with os.fdopen(fd, "wb") as fp:
        fp.write(data)
    return len(data)


def pull_file(source: str, path: str, timeout: float = 300.0) -> int:
    """Stream ``source`` (registered with the FileService of our parent,
    the mux) into ``path``; returns its size."""
    from .files import get_file
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
