"""Run one Ansible command and account for every process it leaves behind.

Benchmark only, controller side, stdlib only. Usage::

    python _ansible_wrap.py RESULT.json STDOUT STDERR TIMEOUT -- ARGV...

(TIMEOUT: seconds ARGV may run before it gets SIGTERM.)

This process makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``)
and starts ARGV (``ansible-playbook ...`` or ``ansible ...``). Processes
that outlive their parent (vanilla's ControlPersist ssh masters, the
mitogen.svc mux once ansible-playbook exited) are re-parented to this
process instead of init, so it can reap them, and the kernel then adds
their CPU time to this process's ``RUSAGE_CHILDREN``. That covers every
process of the run (ansible-playbook, its workers, ssh clients, the mux and
its ssh clients) as long as each was waited for by its parent or by us.

When ARGV exits, its wall time is taken. Then ssh ControlPersist masters
(an ``ssh`` whose command line holds ``ControlPersist``, or that renamed
itself ``ssh: PATH [mux]``) get SIGTERM:
each run starts without a master, as a fresh ansible-playbook run would
after ControlPersist expired, and the target's sshd sessions end so their
CPU can be counted there. Everything else (the mux and its agents' ssh
clients) gets ``GRACE`` seconds to exit on its own before SIGKILL. Once
no child is left, RESULT.json gets::

    {"rc", "wall_s", "teardown_s", "user_s", "sys_s", "masters_terminated",
     "killed", "timed_out"}
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

_PR_SET_CHILD_SUBREAPER = 36
#: Seconds leftovers get to exit on their own once ARGV exited.
GRACE = 30.0


def _set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_CHILD_SUBREAPER): %s" % os.strerror(err))


def proc_stats() -> Dict[int, Tuple[int, str, int, int]]:
    """pid -> (ppid, state, own ticks, children's ticks) for every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as fp:
                raw = fp.read().decode("ascii", "replace")
        except OSError:
            continue
        f = raw[raw.rindex(")") + 2:].split()
        out[int(entry)] = (int(f[1]), f[0], int(f[11]) + int(f[12]), int(f[13]) + int(f[14]))
    return out


def descendants(root: int, procs: Optional[Dict[int, Tuple[int, str, int, int]]] = None
                ) -> List[int]:
    """Every process below ``root`` (in ``procs``, default: read /proc now)."""
    children: Dict[int, List[int]] = {}
    for pid, info in (procs if procs is not None else proc_stats()).items():
        children.setdefault(info[0], []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fp:
            return fp.read()
    except OSError:
        return b""


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def is_control_master(cmdline: bytes) -> bool:
    """An OpenSSH ControlPersist master: still ``ssh ... ControlPersist``,
    or already renamed to ``ssh: CONTROL_PATH [mux]``."""
    words = cmdline.split(b"\0")
    if words[0].startswith(b"ssh: ") and b"[mux]" in words[0]:
        return True
    return os.path.basename(words[0]) == b"ssh" and any(b"ControlPersist" in w for w in words)


def reap_all() -> Tuple[bool, List[Tuple[int, int]]]:
    """Reap every exited child; (no child left, [(pid, exit code)])."""
    reaped: List[Tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True, reaped
        if pid == 0:
            return False, reaped
        reaped.append((pid, os.waitstatus_to_exitcode(status)))


def main(argv: List[str]) -> int:
    if len(argv) < 6 or argv[4] != "--":
        sys.stderr.write(__doc__ or "")
        return 2
    result_path, out_path, err_path, timeout = argv[0], argv[1], argv[2], float(argv[3])
    command = argv[5:]
    _set_subreaper()
    wanted = {signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    # SIGTERM/SIGINT to us: pass it on to the command, keep accounting.
    stop = {"sig": 0}

    def forward(signum: int, frame: object) -> None:
        stop["sig"] = signum

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
        (os.POSIX_SPAWN_OPEN, 2, err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
    ]
    t0 = time.perf_counter()
    main_pid = os.posix_spawnp(command[0], command, dict(os.environ), file_actions=actions,
                               setsigmask=set())
    rc: Optional[int] = None
    wall = 0.0
    me = os.getpid()
    deadline_main = time.monotonic() + timeout
    teardown_deadline = 0.0
    t_end = 0.0
    masters = 0
    killed: List[str] = []
    timed_out = False
    sent_term = False
    while True:
        done, reaped = reap_all()
        for pid, code in reaped:
            if pid == main_pid:
                rc = code
                t_end = time.perf_counter()
                wall = t_end - t0
                teardown_deadline = time.monotonic() + GRACE
                # Vanilla's ControlPersist masters: end them now.
                for victim in descendants(me):
                    if is_control_master(_cmdline(victim)):
                        _signal(victim, signal.SIGTERM)
                        masters += 1
        if done:
            break
        now = time.monotonic()
        if rc is None and (stop["sig"] or now > deadline_main) and not sent_term:
            timed_out = not stop["sig"]
            _signal(main_pid, signal.SIGTERM)
            sent_term = True
            teardown_deadline = now + GRACE
        if (rc is not None or sent_term) and now > teardown_deadline:
            for victim in descendants(me):
                killed.append(_cmdline(victim).replace(b"\0", b" ").decode("utf-8", "replace")[:120])
                _signal(victim, signal.SIGKILL)
            teardown_deadline = now + 5.0
        signal.sigtimedwait(wanted, 0.2)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {"rc": rc, "wall_s": wall, "teardown_s": time.perf_counter() - (t_end or t0),
              "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
              "masters_terminated": masters, "killed": killed, "timed_out": timed_out}
    with open(result_path, "w") as fp:
        json.dump(result, fp)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
