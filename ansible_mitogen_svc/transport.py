"""File-descriptor adapters: the only module that reads or writes fds.

Runs on: controller and targets (shipped).

A transport is a pair of non-blocking fds (the same fd twice for a socket)
plus an optional child process to reap when the stream closes.
"""
from __future__ import annotations

import errno
import os
import socket
import subprocess
from typing import Optional

try:
    from typing import Protocol
except ImportError:  # Python 3.7 controllers are unsupported; 3.8 has it
    Protocol = object  # type: ignore

__all__ = ["Transport", "FdTransport", "READ_SIZE", "set_nonblocking",
           "set_cloexec"]

# One read drains up to 256 KiB: two FileService chunks, thousands of small
# messages. Bigger reads gain nothing measurable and cost memory per stream.
READ_SIZE = 256 * 1024


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def set_cloexec(fd: int) -> None:
    os.set_inheritable(fd, False)


class Transport(Protocol):
    rfd: int
    wfd: int

    def read(self) -> bytes: ...
    def write(self, data: "bytes | memoryview") -> int: ...
    def close(self) -> None: ...


class FdTransport:
    """Reads ``rfd`` and writes ``wfd`` (pipes, a socket, a pty).

    Args:
        rfd, wfd: file descriptors we own; they are made non-blocking and
            close-on-exec and are closed by :meth:`close`.
        proc: a child process whose exit is awaited after close.
        sock: keep a socket object alive (rfd/wfd are its fileno()).
    """

    def __init__(self, rfd: int, wfd: int, proc: Optional[subprocess.Popen] = None,
                 sock: Optional[socket.socket] = None) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.proc = proc
        self._sock = sock
        self.closed = False
        for fd in {rfd, wfd}:
            set_nonblocking(fd)
            set_cloexec(fd)

    @classmethod
    def from_socket(cls, sock: socket.socket) -> "FdTransport":
        fd = sock.fileno()
        return cls(fd, fd, sock=sock)

    def read(self) -> bytes:
        """Return what is available, b"" on EOF. Raises BlockingIOError
        when nothing is ready, OSError when the transport failed."""
        try:
            return os.read(self.rfd, READ_SIZE)
        except OSError as exc:
            if exc.errno == errno.EIO:  # pty master after the child exits
                return b""
            raise

    def write(self, data: "bytes | memoryview") -> int:
        """Write what the fd takes now; 0 when it would block."""
        try:
            return os.write(self.wfd, data)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._sock is not None:
            self._sock.close()
            return
        for fd in {self.rfd, self.wfd}:
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return "FdTransport(rfd=%d, wfd=%d, pid=%s)" % (
            self.rfd, self.wfd, self.proc.pid if self.proc else None)
