"""Settings and measuring helpers shared by every part of bench/runtime.py.

Benchmark only, controller side. The mitogen driver (runtime.py
--mitogen-driver) imports this under the mitogen venv's python, so it must
stay stdlib-only and must not import ansible_mitogen_svc or mitogen.
"""
from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
TESTS_LIB = os.path.join(REPO_ROOT, "tests", "lib")
# The entry point; child processes (proxy server, mitogen driver) run it again.
RUNTIME_SCRIPT = os.path.join(BENCH_DIR, "runtime.py")
TARGET_PYTHON = "/usr/bin/python3"
THREADS = 8

T0 = time.perf_counter()


def log(text: str) -> None:
    sys.stderr.write("[%6.1fs] %s\n" % (time.perf_counter() - T0, text))
    sys.stderr.flush()


def percentile(samples: List[float], q: float) -> float:
    """Nearest-rank percentile of ``samples`` (q in 0..1)."""
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def round_trips(fns: Dict[str, Callable[[], Any]], n: int, warmup: int) -> Dict[str, Any]:
    """Time ``n`` sequential calls of each function in ``fns``. The
    functions take turns call by call, so load drifting on a shared machine
    (and anything still settling after the agent started) hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    clock = time.perf_counter
    items = list(fns.items())
    for _ in range(n):
        for key, fn in items:
            t = clock()
            fn()
            samples[key].append(clock() - t)
    out = {}
    for key, xs in samples.items():
        ms = [x * 1e3 for x in xs]
        out[key] = {"n": n, "p50_ms": percentile(ms, 0.50), "p99_ms": percentile(ms, 0.99),
                    "mean_ms": statistics.fmean(ms), "min_ms": min(ms)}
    return out


def concurrent_rate(fn: Callable[[], Any], threads: int, seconds: float) -> Dict[str, Any]:
    """Calls/s with ``threads`` threads each calling ``fn`` in a loop."""
    barrier = threading.Barrier(threads + 1)
    counts = [0] * threads
    errors: List[str] = []
    deadline = [0.0]

    def worker(i: int) -> None:
        barrier.wait()
        end = deadline[0]
        n = 0
        try:
            while time.perf_counter() < end:
                fn()
                n += 1
        except Exception as exc:  # reported, not raised: figures only
            errors.append(repr(exc)[:200])
        counts[i] = n

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    start = time.perf_counter()
    deadline[0] = start + seconds
    barrier.wait()
    for w in workers:
        w.join(seconds + 60)
    elapsed = time.perf_counter() - start
    out: Dict[str, Any] = {"threads": threads, "calls": sum(counts), "seconds": elapsed,
                           "calls_per_s": sum(counts) / elapsed}
    if errors:
        out["errors"] = errors[:3]
    return out


def wchar() -> Optional[int]:
    """Bytes this process has passed to write()-like syscalls so far."""
    try:
        with open("/proc/self/io") as fp:
            for line in fp:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def timed_command(argv: List[str], n: int) -> Dict[str, Any]:
    """Run ``argv`` ``n`` times, output discarded; wall time of each run."""
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True, timeout=60)
        samples.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": median(samples), "all_ms": samples}


def os_name() -> str:
    """The distribution's name, for report headers."""
    import platform
    try:
        with open("/etc/os-release") as fp:
            for line in fp:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()
