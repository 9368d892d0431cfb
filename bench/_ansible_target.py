"""CPU time spent on the testbed targets, read from /proc.

Benchmark only, controller side, stdlib only. Each tests/lib/testbed.py
host is a supervisor process (a child subreaper) running the listening
sshd; every ssh session, login shell, module interpreter and agent on that
host is a descendant of the supervisor, and an orphan is re-parented to it.

The CPU of a tree is conserved while it lives: a live process shows its own
time (``utime + stime``) and, in ``cutime + cstime``, the total of the
children it has waited for; when a process is reaped its total moves into
its parent's ``cutime/cstime``. So, for one host,

    sum over live descendants (zombies included) of utime+stime+cutime+cstime
    + the supervisor's own cutime+cstime

only grows, and its difference between two moments is exactly the CPU that
the host's processes used in between, including processes that started and
exited in that interval. The supervisor's own utime/stime (test harness,
not target) is left out. Nothing here uses SIGCHLD=SIG_IGN (which would
let the kernel drop a child's time).
"""
from __future__ import annotations

import os
import time
from typing import Dict, Iterable, List, Tuple

from _ansible_wrap import descendants, proc_stats  # noqa: E402  (bench/ is on sys.path)

CLK_TCK = os.sysconf("SC_CLK_TCK")


class TargetMeter:
    """CPU seconds used under a set of testbed supervisors (one per host)."""

    def __init__(self, supervisor_pids: Iterable[int]) -> None:
        self.roots = [p for p in supervisor_pids if p]

    def sample(self) -> Tuple[float, int]:
        """(CPU seconds so far, processes beyond one listening sshd per host)."""
        procs = proc_stats()
        ticks = 0
        extra = 0
        for root in self.roots:
            if root not in procs:
                continue
            ticks += procs[root][3]
            tree = descendants(root, procs)
            extra += max(0, len(tree) - 1)
            for pid in tree:
                info = procs.get(pid)
                if info is not None:
                    ticks += info[2] + info[3]
        return ticks / CLK_TCK, extra

    def wait_quiet(self, timeout: float = 15.0) -> bool:
        """Wait until each host runs only its listening sshd (no sessions)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.sample()[1] == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
