"""The virgin fork parent: a single-threaded process that forks children on
request.

Runs on: targets (shipped).

Theory of operation
-------------------
An agent calls :func:`start` first thing, before it starts any thread or
imports any task code, so the fork parent is a clean copy of a freshly
bootstrapped interpreter. It then only ever does this, one request at a
time, over a SOCK_SEQPACKET socketpair:

1. receive a request packet: a codec dict (ids, parent id, name, detach)
   plus one fd (SCM_RIGHTS): the child's end of a fresh socketpair whose
   other end the agent keeps as the child's stream;
2. fork; the child closes the control socket and runs
   :func:`ansible_mitogen_svc.agent.child_main` on the passed fd, so its
   router's parent is the agent while its process parent is us;
3. reply with a codec dict ``{"pid": pid}``;
4. reap exited children with ``waitpid(WNOHANG)`` between requests.

EOF on the control socket (the agent died) ends the fork parent. Children
do not die with it: each notices its own stream's EOF.
"""
from __future__ import annotations

import array
import os
import select
import socket
import threading
from typing import Callable, List, Optional, Sequence, Tuple

from . import codec
from .errors import BrokenError

__all__ = ["ForkServer", "start", "send_packet", "recv_packet"]

_MAX_PACKET = 65536


def send_packet(sock: socket.socket, obj: object, fds: Sequence[int] = ()) -> None:
    """Send one codec packet, with ``fds`` attached (SCM_RIGHTS)."""
    data = codec.dumps(obj)
    if not fds:
        sock.sendall(data)
    else:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def recv_packet(sock: socket.socket, max_fds: int = 4) -> Tuple[Optional[object], List[int]]:
    """Receive one packet; returns (object or None on EOF, received fds)."""
    fds = array.array("i")
    data, anc, _flags, _addr = sock.recvmsg(_MAX_PACKET, socket.CMSG_SPACE(max_fds * fds.itemsize))
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - (len(cdata) % fds.itemsize)])
    if not data:
        return None, list(fds)
    return codec.loads(data), list(fds)


def _reap() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _serve(sock: socket.socket, child_main: Callable[[int, dict], None]) -> None:
    while True:
        r, _, _ = select.select([sock], [], [], 1.0)
        _reap()
        if not r:
            continue
        try:
            req, fds = recv_packet(sock, max_fds=1)
        except (OSError, ValueError):
            return
        if req is None or not isinstance(req, dict) or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            if req is None:
                return
            continue
        fd = fds[0]
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                sock.close()
                if req.get("detach"):
                    os.setsid()
                child_main(fd, req)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(fd)
        send_packet(sock, {"pid": pid})


def start(child_main: Callable[[int, dict], None],
          close_fds: Tuple[int, ...] = ()) -> "ForkServer":
    """Fork the fork parent now. Call before any thread exists.
    ``close_fds`` (the agent's own stream) are closed in the fork parent,
    so neither it nor any child it forks can write to them."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            parent.close()
            for fd in close_fds:
                os.close(fd)
            _serve(child, child_main)
        finally:
            os._exit(0)
    child.close()
    parent.set_inheritable(False)
    return ForkServer(pid, parent)


class ForkServer:
    """The agent's handle on its fork parent; thread-safe."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._lock = threading.Lock()

    def fork(self, request: dict, fd: int, timeout: float = 30.0) -> int:
        """Fork a child that will use ``fd`` as its stream; returns its pid.

        Raises:
            BrokenError: the fork parent is gone or did not answer in time.
        """
        with self._lock:
            try:
                send_packet(self._sock, request, [fd])
                r, _, _ = select.select([self._sock], [], [], timeout)
                if not r:
                    raise BrokenError("fork parent %d did not answer within %.0fs"
                                      % (self.pid, timeout))
                reply, extra = recv_packet(self._sock)
            except OSError as exc:
                raise BrokenError("fork parent %d is gone: %s" % (self.pid, exc)) from exc
        for fd in extra:
            os.close(fd)
        if not isinstance(reply, dict) or "pid" not in reply:
            raise BrokenError("fork parent %d closed the control socket" % self.pid)
        return int(reply["pid"])

    def close(self) -> None:
        self._sock.close()
