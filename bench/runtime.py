#!/usr/bin/env python3
"""Runtime benchmarks of ansible_mitogen_svc, with mitogen side by side.

Run from the repository root::

    python bench/runtime.py [--quick] [--json out.json] [--no-mitogen]

It prints figures, never a verdict: no-op call round trips (p50/p99),
calls/s with 8 caller threads, FileService throughput, agent bootstrap time
and bytes, over local pipes, ssh to a loopback sshd (tests/lib/testbed.py,
needs root and /usr/sbin/sshd) and ssh through a 10 ms RTT proxy
(tests/lib/latency_proxy.py). When the ``mitogen`` package can be installed
from PyPI into a private venv, the same figures are measured for it by
running this file again with that venv's interpreter (``--mitogen-driver``).

Everything it starts (agents, sshd, proxies, drivers) is stopped before it
exits. Figures on a shared 2-core machine are noisy: medians are reported.

This file must stay importable without ansible_mitogen_svc on the path and
without mitogen (the driver mode imports only mitogen, the main mode only
the runtime): imports of either happen inside functions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
TESTS_LIB = os.path.join(REPO_ROOT, "tests", "lib")
TARGET_PYTHON = "/usr/bin/python3"
AGENT = "ansible_mitogen_svc.agent.AgentService"
THREADS = 8
LATENCY_ONE_WAY = 0.005  # seconds each way: 10 ms round trip
DEFAULT_VENV = os.path.join(tempfile.gettempdir(), "msvc-bench-mitogen-venv-py%d.%d"
                            % sys.version_info[:2])

# Goals from the issue, shown next to the figures (no verdict is printed).
GOAL_RT_MS = 0.5
GOAL_BOOT_MS = 100.0
GOAL_BOOT_BYTES = 30000

T0 = time.perf_counter()


def log(text: str) -> None:
    sys.stderr.write("[%6.1fs] %s\n" % (time.perf_counter() - T0, text))
    sys.stderr.flush()


class Params:
    """How much to measure: full run (~2-3 min) or --quick (<40 s)."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.rt_n = 300 if quick else 2000          # sequential calls per round-trip figure
        self.rt_n_slow = 40 if quick else 200       # same through the 10 ms RTT proxy
        self.warmup = 30 if quick else 100
        self.conc_secs = 0.5 if quick else 2.0      # per calls/s figure
        self.boot_n = 3 if quick else 15            # bootstraps per transport
        self.boot_n_slow = 2 if quick else 5        # same through the proxy
        self.file_mib = 64 if quick else 256
        self.file_mib_slow = 0 if quick else 64     # FileService through the proxy
        self.tcp_bytes = not quick                  # ssh TCP byte count (one more session each)

    def as_dict(self) -> Dict[str, Any]:
        return dict(vars(self))


# -- measuring helpers (shared by the main mode and the mitogen driver) --------

def percentile(samples: List[float], q: float) -> float:
    """Nearest-rank percentile of ``samples`` (q in 0..1)."""
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


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


def median(xs: List[float]) -> float:
    return statistics.median(xs)


# -- helper processes -------------------------------------------------------------

class ProxyProcess:
    """LatencyProxy instances in a child process (this file, --proxy-server
    mode), so the proxies' event loop never competes for our GIL."""

    def __init__(self, target: List[Any], delays: List[float]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--proxy-server",
             json.dumps({"target": target, "delays": delays})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.stop()
            raise RuntimeError("proxy process did not start")
        self.addresses = [tuple(a) for a in json.loads(line)["addresses"]]

    def stats(self) -> List[Dict[str, int]]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s["connections_active"] == 0 for s in self.stats()):
                return
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


def proxy_server_main(spec_json: str) -> int:
    import dataclasses
    sys.path.insert(0, TESTS_LIB)
    from latency_proxy import LatencyProxy  # type: ignore[import-not-found]
    spec = json.loads(spec_json)
    target = (spec["target"][0], int(spec["target"][1]))
    proxies = [LatencyProxy(target=target, delay=float(d)).start() for d in spec["delays"]]
    try:
        print(json.dumps({"addresses": [list(p.address) for p in proxies]}), flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "stats":
                print(json.dumps([dataclasses.asdict(p.stats) for p in proxies]), flush=True)
            elif cmd == "quit":
                break
    finally:
        for p in proxies:
            p.stop()
    return 0


def timed_command(argv: List[str], n: int) -> Dict[str, Any]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True, timeout=60)
        samples.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": median(samples), "all_ms": samples}


# -- targets ----------------------------------------------------------------------

class Target:
    """Where agents run: local pipes, ssh, or ssh through a proxy."""

    def __init__(self, key: str, label: str, host: Any = None,
                 via: Optional[tuple] = None) -> None:
        self.key = key
        self.label = label
        self.host = host
        self.via = via

    @property
    def is_ssh(self) -> bool:
        return self.host is not None

    def ssh_spec(self, via: Optional[tuple] = None) -> Dict[str, Any]:
        """Arguments for connect.ssh / mitogen's router.ssh."""
        h = self.host
        via = via or self.via
        args = list(h.ssh_options())
        if via is None:
            return {"hostname": h.address, "port": h.port, "username": "root",
                    "identity_file": str(h.key_path), "ssh_args": args}
        args += ["-o", "HostKeyAlias=[%s]:%d" % (h.address, h.port)]
        return {"hostname": via[0], "port": via[1], "username": "root",
                "identity_file": str(h.key_path), "ssh_args": args}

    def ssh_true_argv(self, via: Optional[tuple] = None) -> List[str]:
        via = via or self.via
        return self.host.ssh_argv("root", via=via) + ["true"]


# -- ansible_mitogen_svc -------------------------------------------------------------

class Msvc:
    """Measures ansible_mitogen_svc in this process."""

    def __init__(self, params: Params, tmp: str) -> None:
        sys.path.insert(0, REPO_ROOT)
        sys.path.insert(0, BENCH_DIR)
        import ansible_mitogen_svc
        from ansible_mitogen_svc import Pool, Router, bootstrap, connect
        import _bench_remote  # noqa: F401  (shipped to agents by name)
        self.p = params
        self.tmp = tmp
        self.bootstrap = bootstrap
        self.connect = connect
        self.remote = _bench_remote
        self.files: Any = None
        self.file_service: Any = None
        self.extra = ["_bench_remote"]
        self.files_error = ""
        try:
            from ansible_mitogen_svc import files
            self.files = files
            self.extra.append("ansible_mitogen_svc.files")
        except ImportError as exc:
            self.files_error = str(exc)
        self.router = Router(name="bench")
        self.pool = None
        if self.files is not None:
            self.pool = Pool(self.router, [files.FileService], size=4)
            self.file_service = self.pool.get(files.FileService.name)
        self.info = {"version": getattr(ansible_mitogen_svc, "__version__", "checkout")}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop(timeout=5)
        self.router.shutdown()
        self.router.join(20)

    # stage 2 ------------------------------------------------------------------
    def stage2_figures(self) -> Dict[str, Any]:
        """Build stage 2 cold (first use in this process) and size it."""
        t = time.perf_counter()
        blob, sources = self.bootstrap.stage2(())
        build_ms = (time.perf_counter() - t) * 1e3
        raw = sum(len(src) for _, src in sources.values())
        return {"stage2_bytes": len(blob), "stage2_build_ms": build_ms,
                "modules": len(sources), "source_chars_minified": raw,
                "first_stage_argv_chars": len(" ".join(
                    self.bootstrap.first_stage_argv(TARGET_PYTHON, len(blob))))}

    # connecting ---------------------------------------------------------------
    def start(self, target: Target, name: str, extra: Optional[List[str]] = None,
              via: Optional[tuple] = None) -> Any:
        extra = self.extra if extra is None else extra
        if not target.is_ssh:
            return self.connect.local(self.router, python=TARGET_PYTHON, name=name,
                                      extra_modules=extra)
        s = target.ssh_spec(via)
        return self.connect.ssh(self.router, s["hostname"], username=s["username"],
                                port=s["port"], identity_file=s["identity_file"],
                                ssh_args=s["ssh_args"], python=TARGET_PYTHON, name=name,
                                extra_modules=extra)

    def stop(self, ctx: Any) -> None:
        """Ask the agent to exit and wait until its process (or ssh) is gone."""
        stream = self.router.stream_to(ctx.context_id)
        proc = stream.transport.proc if stream is not None else None
        try:
            ctx.shutdown()
        except Exception:
            pass
        if proc is not None:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def bootstrap_cycle(self, target: Target, name: str,
                        via: Optional[tuple] = None) -> Dict[str, Any]:
        """Connect a bare agent, call ping once, shut it down."""
        from ansible_mitogen_svc import call
        captured: Dict[str, int] = {}
        real_encode = self.bootstrap.encode_config

        def encode_config(config: dict) -> bytes:
            data = real_encode(config)
            captured["config"] = len(data)
            return data
        self.bootstrap.encode_config = encode_config  # measure only; restored below
        try:
            w0 = wchar()
            t0 = time.perf_counter()
            ctx = self.start(target, name, extra=[], via=via)
            t1 = time.perf_counter()
            w1 = wchar()
        finally:
            self.bootstrap.encode_config = real_encode
        stream = self.router.stream_to(ctx.context_id)
        frames0 = stream.bytes_out if stream is not None else 0
        call(ctx, AGENT, "ping")
        t2 = time.perf_counter()
        frames = (stream.bytes_out if stream is not None else 0) - frames0
        self.stop(ctx)
        out = {"connect_ms": (t1 - t0) * 1e3, "first_call_ms": (t2 - t1) * 1e3,
               "stage2_bytes": len(self.bootstrap.stage2(())[0]),
               "config_bytes": captured.get("config", 0), "first_call_frame_bytes": frames}
        out["payload_bytes"] = out["stage2_bytes"] + out["config_bytes"]
        if w0 is not None and w1 is not None:
            out["wchar_connect_bytes"] = w1 - w0
        return out

    def bootstrap_series(self, target: Target, n: int, via: Optional[tuple] = None) -> Dict[str, Any]:
        """``n`` bootstrap cycles; over ssh each one is paired with an
        `ssh true` run just before it, so that load drifting on a shared
        machine hits both halves of the difference alike."""
        cycles: List[Dict[str, Any]] = []
        for i in range(n):
            ssh_true = None
            if target.is_ssh:
                ssh_true = timed_command(target.ssh_true_argv(via), 1)["median_ms"]
            c = self.bootstrap_cycle(target, "boot%d" % i, via=via)
            c["ssh_true_ms"] = ssh_true
            cycles.append(c)
        last = cycles[-1]
        out = {"n": n,
               "connect_ms": median([c["connect_ms"] for c in cycles]),
               "connect_all_ms": [round(c["connect_ms"], 1) for c in cycles],
               "first_call_ms": median([c["first_call_ms"] for c in cycles]),
               "connect_first_call_ms": median([c["connect_ms"] + c["first_call_ms"]
                                                for c in cycles]),
               "stage2_bytes": last["stage2_bytes"], "config_bytes": last["config_bytes"],
               "payload_bytes": last["payload_bytes"],
               "first_call_frame_bytes": last["first_call_frame_bytes"],
               "sent_bytes": last["payload_bytes"] + last["first_call_frame_bytes"],
               "wchar_connect_bytes": median([c.get("wchar_connect_bytes", 0) for c in cycles])}
        if target.is_ssh:
            out["ssh_true_ms"] = median([c["ssh_true_ms"] for c in cycles])
            out["ssh_true_all_ms"] = [round(c["ssh_true_ms"], 1) for c in cycles]
            out["beyond_ssh_ms"] = median([c["connect_ms"] - c["ssh_true_ms"] for c in cycles])
        return out

    # calls --------------------------------------------------------------------
    def calls(self, ctx: Any, slow: bool) -> Dict[str, Any]:
        from ansible_mitogen_svc import call
        remote = self.remote
        n = self.p.rt_n_slow if slow else self.p.rt_n
        warm = max(5, self.p.warmup // (10 if slow else 1))

        def ping() -> Any:
            return call(ctx, AGENT, "ping")

        def fn() -> Any:
            return ctx.call(remote.noop)
        rt = round_trips({"ping": ping, "fn": fn}, n, warm)
        return {"rt_ping": rt["ping"], "rt_fn": rt["fn"],
                "conc_ping": concurrent_rate(ping, THREADS, self.p.conc_secs),
                "conc_fn": concurrent_rate(fn, THREADS, self.p.conc_secs)}

    def file_transfer(self, ctx: Any, src: str, mib: int) -> Dict[str, Any]:
        dest = os.path.join(self.tmp, "fetched-%d" % ctx.context_id)
        t = time.perf_counter()
        r = ctx.call(self.remote.fetch, src, dest, 600.0)
        elapsed = time.perf_counter() - t
        size = int(r["size"])
        return {"mib": mib, "bytes": size, "seconds": elapsed,
                "mb_per_s": size / elapsed / 1e6, "agent_seconds": r["seconds"],
                "complete": size == mib * 1024 * 1024}


# -- mitogen ------------------------------------------------------------------------

def ensure_mitogen(venv: str) -> Dict[str, Any]:
    """A venv with mitogen from PyPI: {"python": path, "version": v} or
    {"error": why}. Reused when it already works."""
    py = os.path.join(venv, "bin", "python")
    probe = [py, "-c", "import mitogen, mitogen.master; print('%d.%d.%d' % mitogen.__version__)"]

    def check() -> Optional[str]:
        if not os.path.exists(py):
            return None
        r = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        return r.stdout.strip() if r.returncode == 0 else None
    try:
        version = check()
        if version:
            return {"python": py, "version": version, "venv": venv, "reused": True}
        if os.path.exists(venv):
            if not os.path.exists(os.path.join(venv, "pyvenv.cfg")):
                return {"error": "%s exists and is not a venv; not touching it" % venv}
            shutil.rmtree(venv, ignore_errors=True)  # a broken venv of ours: redo it
        log("creating %s and installing mitogen from PyPI" % venv)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=180,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        r = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "mitogen"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            return {"error": "pip install mitogen failed: %s" % (r.stderr.strip()[-300:],)}
        version = check()
        if not version:
            return {"error": "mitogen installed but does not import"}
        return {"python": py, "version": version, "venv": venv, "reused": False}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": "%s: %s" % (type(exc).__name__, exc)}


def run_mitogen_driver(mito: Dict[str, Any], spec: Dict[str, Any], tmp: str,
                       timeout: float = 240.0) -> Dict[str, Any]:
    """Run this file with mitogen's venv python in --mitogen-driver mode."""
    err_path = os.path.join(tmp, "mitogen-driver.stderr")
    with open(err_path, "w") as err:
        try:
            r = subprocess.run([mito["python"], os.path.abspath(__file__), "--mitogen-driver",
                                json.dumps(spec)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=err, text=True,
                               timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"error": "driver timed out after %.0fs" % timeout}
    if r.returncode != 0 or not r.stdout.strip():
        with open(err_path) as fp:
            tail = fp.read()[-600:]
        return {"error": "driver failed (rc %s): %s" % (r.returncode, tail.strip())}
    return json.loads(r.stdout.strip().splitlines()[-1])


def mitogen_driver_main(spec_json: str) -> int:
    """Runs under mitogen's venv python: measures mitogen, prints JSON."""
    import mitogen
    import mitogen.core
    import mitogen.master
    sys.path.insert(0, BENCH_DIR)
    import _bench_remote
    spec = json.loads(spec_json)
    p = spec["params"]
    broker = mitogen.master.Broker()
    router = mitogen.master.Router(broker)
    out: Dict[str, Any] = {"version": "%d.%d.%d" % mitogen.__version__}

    def connect(name: str) -> Any:
        s = spec.get("ssh")
        if s is None:
            return router.local(python_path=TARGET_PYTHON, name=name)
        return router.ssh(hostname=s["hostname"], port=s["port"], username=s["username"],
                          identity_file=s["identity_file"], ssh_args=s["ssh_args"],
                          check_host_keys="enforce", compression=False,
                          python_path=TARGET_PYTHON, name=name)

    def stop(ctx: Any) -> None:
        ctx.shutdown().get(timeout=15)

    # Bytes mitogen writes to its streams (wchar cannot be used here: the
    # kernel adds the I/O of reaped children, and mitogen reaps the previous
    # context while the next one connects).
    written = [0]
    real_write = mitogen.core.Side.write

    def counting_write(side: Any, data: Any) -> Any:
        n = real_write(side, data)
        written[0] += n or 0
        return n
    mitogen.core.Side.write = counting_write  # measurement only

    try:
        if spec.get("boot_n"):
            cycles: List[Dict[str, Any]] = []
            for i in range(int(spec["boot_n"])):
                ssh_true = None
                if spec.get("ssh_true_argv"):
                    ssh_true = timed_command(spec["ssh_true_argv"], 1)["median_ms"]
                b0 = written[0]
                t0 = time.perf_counter()
                ctx = connect("boot%d" % i)
                t1 = time.perf_counter()
                b1 = written[0]
                ctx.call(os.getpid)  # first call of a built-in: no module to ship
                t2 = time.perf_counter()
                b2 = written[0]
                stop(ctx)
                cycles.append({"connect_ms": (t1 - t0) * 1e3, "first_call_ms": (t2 - t1) * 1e3,
                               "connect_bytes": b1 - b0, "sent_bytes": b2 - b0,
                               "ssh_true_ms": ssh_true})
            boot = {
                "n": len(cycles),
                "connect_ms": median([c["connect_ms"] for c in cycles]),
                "connect_all_ms": [round(c["connect_ms"], 1) for c in cycles],
                "first_call_ms": median([c["first_call_ms"] for c in cycles]),
                "connect_first_call_ms": median([c["connect_ms"] + c["first_call_ms"]
                                                 for c in cycles]),
                "connect_bytes": median([c["connect_bytes"] for c in cycles]),
                "sent_bytes": median([c["sent_bytes"] for c in cycles])}
            if spec.get("ssh_true_argv"):
                boot["ssh_true_ms"] = median([c["ssh_true_ms"] for c in cycles])
                boot["beyond_ssh_ms"] = median([c["connect_ms"] - c["ssh_true_ms"]
                                                for c in cycles])
            out["boot"] = boot
        if spec.get("calls"):
            ctx = connect("bench")
            slow = bool(spec.get("slow"))
            n = p["rt_n_slow"] if slow else p["rt_n"]
            warm = max(5, p["warmup"] // (10 if slow else 1))

            def fn() -> Any:
                return ctx.call(_bench_remote.noop)
            out["rt_fn"] = round_trips({"fn": fn}, n, warm)["fn"]
            out["conc_fn"] = concurrent_rate(fn, THREADS, p["conc_secs"])
            out["module_stats"] = router.get_stats()
            stop(ctx)
    finally:
        broker.shutdown()
        broker.join()
    print(json.dumps(out))
    return 0


# -- report ---------------------------------------------------------------------------

def fmt_rt(d: Any) -> str:
    if not isinstance(d, dict) or "p50_ms" not in d:
        return "-"
    return "%.3f / %.3f" % (d["p50_ms"], d["p99_ms"])


def fmt_rate(d: Any) -> str:
    if not isinstance(d, dict) or "calls_per_s" not in d:
        return "-"
    s = "%.0f" % d["calls_per_s"]
    if d.get("errors"):
        s += " (errors)"
    return s


def fmt_num(v: Any, pattern: str) -> str:
    return pattern % v if isinstance(v, (int, float)) else "-"


def render_table(title: str, header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["", "## " + title, "  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def report(res: Dict[str, Any]) -> str:
    ms, mg = res["msvc"], res["mitogen"]
    mname = "mitogen %s" % res["meta"]["mitogen"].get("version", "") \
        if "version" in res["meta"]["mitogen"] else "mitogen"
    labels = res["meta"]["targets"]
    parts = []
    mnote = res["meta"]["mitogen"].get("error")

    def g(d: Dict[str, Any], *keys: str) -> Any:
        for k in keys:
            if not isinstance(d, dict):
                return None
            d = d.get(k)  # type: ignore[assignment]
        return d

    def mcell(key: str, *path: str, f: Callable[[Any], str]) -> str:
        if mnote:
            return "n/a"
        v = g(mg, key, *path)
        if v is None and isinstance(mg.get(key), dict) and "error" in mg[key]:
            return "error"
        return f(v)

    rows = []
    for key in labels:
        if key in res["skipped"]:
            rows.append([labels[key], "(all)", "skipped: " + res["skipped"][key], ""])
            continue
        rows.append([labels[key], "AgentService.ping", fmt_rt(g(ms, key, "rt_ping")), "n/a"])
        rows.append([labels[key], "shipped no-op fn", fmt_rt(g(ms, key, "rt_fn")),
                     mcell(key, "rt_fn", f=fmt_rt)])
    parts.append(render_table("No-op call round trip, ms (p50 / p99)",
                              ["transport", "call", "msvc", mname], rows))

    rows = []
    for key in labels:
        if key in res["skipped"]:
            continue
        rows.append([labels[key], "AgentService.ping", fmt_rate(g(ms, key, "conc_ping")), "n/a"])
        rows.append([labels[key], "shipped no-op fn", fmt_rate(g(ms, key, "conc_fn")),
                     mcell(key, "conc_fn", f=fmt_rate)])
    parts.append(render_table("Calls/s with %d concurrent caller threads" % THREADS,
                              ["transport", "call", "msvc", mname], rows))

    rows = []
    for key in labels:
        if key in res["skipped"]:
            continue
        f = g(ms, key, "file")
        if isinstance(f, dict) and "mb_per_s" in f:
            cell = "%.1f MB/s (%d MiB in %.2f s)" % (f["mb_per_s"], f["mib"], f["seconds"])
            if not f.get("complete"):
                cell += " INCOMPLETE"
        elif isinstance(f, dict) and f.get("skipped"):
            cell = "skipped: " + f["skipped"]
        elif isinstance(f, dict):
            cell = "error: %s" % f.get("error", "?")
        else:
            cell = "-"
        rows.append([labels[key], cell])
    parts.append(render_table("FileService.get_file throughput (1 MB = 10^6 bytes)",
                              ["transport", "msvc"], rows))

    rows = []
    st = res["stage2"]
    ms_fmt = (lambda v: fmt_num(v, "%.1f ms"))
    for key in labels:
        if key in res["skipped"]:
            continue
        b = g(ms, key, "boot") or {}
        lab = labels[key]
        rows.append([lab, "connect (median of %s)" % b.get("n", "?"),
                     ms_fmt(b.get("connect_ms")), mcell(key, "boot", "connect_ms", f=ms_fmt)])
        rows.append([lab, "first call on the fresh agent (median)",
                     ms_fmt(b.get("first_call_ms")),
                     mcell(key, "boot", "first_call_ms", f=ms_fmt)])
        rows.append([lab, "connect + first call (ping / os.getpid)",
                     ms_fmt(b.get("connect_first_call_ms")),
                     mcell(key, "boot", "connect_first_call_ms", f=ms_fmt)])
        if "ssh_true_ms" in b:
            rows.append([lab, "`ssh true` just before each connect",
                         ms_fmt(b.get("ssh_true_ms")), mcell(key, "boot", "ssh_true_ms", f=ms_fmt)])
            rows.append([lab, "connect minus `ssh true` (median of pairs)",
                         ms_fmt(b.get("beyond_ssh_ms")),
                         mcell(key, "boot", "beyond_ssh_ms", f=ms_fmt)])
        base = g(res, "baseline", key) or {}
        if "python_ms" in base:
            rows.append([lab, "`python3 -c pass` (start-up floor)",
                         ms_fmt(base["python_ms"]), ""])
        rows.append([lab, "bytes to agent: connect + first call",
                     fmt_num(b.get("sent_bytes"), "%d B"),
                     mcell(key, "boot", "sent_bytes", f=lambda v: fmt_num(v, "%d B"))])
        rows.append([lab, "  check: controller write() bytes, connect",
                     fmt_num(b.get("wchar_connect_bytes"), "%d B (wchar)"),
                     mcell(key, "boot", "connect_bytes",
                           f=lambda v: fmt_num(v, "%d B (streams)"))])
        tcp = g(ms, key, "tcp")
        mtcp = g(mg, key, "tcp")
        if tcp:
            rows.append([lab, "ssh TCP bytes up / down, minus `ssh true`",
                         "%d / %d B" % (tcp["up"], tcp["down"]),
                         "n/a" if mnote else ("%d / %d B" % (mtcp["up"], mtcp["down"])
                                              if mtcp and "up" in mtcp else "-")])
    rows.append(["(any)", "stage 2 + config, exact", "%d + %d = %d B" % (
        st["stage2_bytes"], st.get("config_bytes", 0),
        st["stage2_bytes"] + st.get("config_bytes", 0)), ""])
    rows.append(["(any)", "stage 2 build (once per controller)", "%.0f ms (%d modules)" % (
        st["stage2_build_ms"], st["modules"]), ""])
    parts.append(render_table("Agent bootstrap (bare agent, then one built-in call)",
                              ["transport", "figure", "msvc", mname], rows))

    goals = res.get("goals", {})
    rows = [[k, v["goal"], v["measured"]] for k, v in goals.items()]
    parts.append(render_table("Goals from the issue (figures only)", ["goal", "target", "measured"],
                              rows))
    notes = ["", "Notes:"]
    if mnote:
        notes.append("* mitogen not available: %s" % mnote)
    for key, why in res["skipped"].items():
        notes.append("* %s skipped: %s" % (labels.get(key, key), why))
    for key in labels:
        if g(ms, key, "error"):
            notes.append("* msvc %s: %s" % (labels[key], ms[key]["error"]))
        if g(mg, key, "error"):
            notes.append("* mitogen %s: %s" % (labels[key], mg[key]["error"]))
    for key in labels:
        f = g(ms, key, "file")
        if isinstance(f, dict) and f.get("why"):
            notes.append("* FileService %s skipped: %s" % (labels[key], f["why"]))
    notes.append("* 2 shared cores: figures are noisy; medians are reported.")
    return "\n".join(parts + notes)


# -- main -----------------------------------------------------------------------------

def python_version(py: str) -> str:
    try:
        r = subprocess.run([py, "-c", "import sys; print(sys.version.split()[0])"],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or "?"
    except OSError:
        return "missing"


def os_name() -> str:
    try:
        with open("/etc/os-release") as fp:
            for line in fp:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("signal %d" % signum)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (< 40 s)")
    ap.add_argument("--json", metavar="FILE", help="also write all figures as JSON")
    ap.add_argument("--no-mitogen", action="store_true", help="skip the mitogen comparison")
    ap.add_argument("--no-ssh", action="store_true", help="skip ssh (no testbed)")
    ap.add_argument("--mitogen-venv", default=DEFAULT_VENV,
                    help="where to create/reuse the mitogen venv (default %(default)s)")
    ap.add_argument("--mitogen-driver", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--proxy-server", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop what we started.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if args.mitogen_driver:
        return mitogen_driver_main(args.mitogen_driver)
    if args.proxy_server:
        return proxy_server_main(args.proxy_server)

    params = Params(args.quick)
    tmp = tempfile.mkdtemp(prefix="msvc-bench-")
    os.chmod(tmp, 0o755)
    res: Dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": "%s, %d cores, %s" % (os_name(), os.cpu_count() or 0, platform.machine()),
            "load_average": list(os.getloadavg()),
            "controller_python": "%s (%s)" % (platform.python_version(), sys.executable),
            "target_python": "%s (%s)" % (python_version(TARGET_PYTHON), TARGET_PYTHON),
            "quick": args.quick, "params": params.as_dict(),
        },
        "msvc": {}, "mitogen": {}, "skipped": {}, "baseline": {}, "stage2": {},
    }
    labels = {"local": "local pipes", "ssh": "ssh loopback",
              "ssh10": "ssh + %g ms RTT" % (2 * LATENCY_ONE_WAY * 1e3)}
    res["meta"]["targets"] = labels
    testbed = proxies = msvc = None
    try:
        # mitogen first: installing it (first run only) is the slowest step.
        if args.no_mitogen:
            mito: Dict[str, Any] = {"error": "--no-mitogen given"}
        else:
            mito = ensure_mitogen(args.mitogen_venv)
        res["meta"]["mitogen"] = mito
        if "error" in mito:
            log("mitogen not available: %s" % mito["error"])
            print("mitogen not available: %s" % mito["error"])

        msvc = Msvc(params, tmp)
        res["stage2"] = msvc.stage2_figures()
        targets = [Target("local", labels["local"])]

        # ssh testbed
        ssh_reason = None
        if args.no_ssh:
            ssh_reason = "--no-ssh given"
        else:
            try:
                sys.path.insert(0, TESTS_LIB)
                from testbed import Testbed  # type: ignore[import-not-found]
                ok, why = Testbed.available()
                if not ok:
                    ssh_reason = why
            except Exception as exc:
                ssh_reason = "tests/lib/testbed.py unusable: %s" % exc
        if ssh_reason is None:
            try:
                log("starting a 1-host sshd testbed")
                testbed = Testbed(os.path.join(tmp, "testbed"), 1).start()
                host = testbed.hosts[0]
                targets.append(Target("ssh", labels["ssh"], host))
                try:
                    # proxy 0: no delay, only counts bytes; proxy 1: 10 ms RTT.
                    proxies = ProxyProcess([host.address, host.port], [0.0, LATENCY_ONE_WAY])
                    targets.append(Target("ssh10", labels["ssh10"], host, via=proxies.addresses[1]))
                except Exception as exc:
                    res["skipped"]["ssh10"] = "latency proxy failed: %s" % exc
            except Exception as exc:
                ssh_reason = "testbed failed to start: %s" % exc
                testbed = None
        if ssh_reason is not None:
            res["skipped"]["ssh"] = ssh_reason
            res["skipped"]["ssh10"] = ssh_reason
            print("ssh skipped: %s" % ssh_reason)

        res["baseline"]["local"] = {"python_ms": timed_command(
            [TARGET_PYTHON, "-c", "pass"], params.boot_n)["median_ms"]}

        src = ""
        if msvc.files is not None:
            src = os.path.join(tmp, "payload.bin")
            with open(src, "wb") as fp:
                for _ in range(params.file_mib):
                    fp.write(os.urandom(1 << 20))
            msvc.file_service.register(src)

        for target in targets:
            key = target.key
            slow = key == "ssh10"
            mine: Dict[str, Any] = {}
            res["msvc"][key] = mine
            ctx = None
            try:
                # bootstrap
                log("%s: msvc bootstrap%s" % (key, " (each after an `ssh true`)" if target.is_ssh
                                              else ""))
                mine["boot"] = msvc.bootstrap_series(
                    target, params.boot_n_slow if slow else params.boot_n)
                if key == "local":
                    res["stage2"]["config_bytes"] = mine["boot"]["config_bytes"]
                if key == "ssh" and proxies is not None and params.tcp_bytes:
                    mine["tcp"] = tcp_bytes(proxies, target, lambda: msvc.bootstrap_cycle(
                        target, "bytes", via=proxies.addresses[0]))
                # calls
                log("%s: msvc round trips and concurrency" % key)
                ctx = msvc.start(target, "bench-" + key)
                mine.update(msvc.calls(ctx, slow))
                # FileService
                mib = params.file_mib_slow if slow else params.file_mib
                if msvc.files is None:
                    mine["file"] = {"skipped": "files.py not available",
                                    "why": msvc.files_error}
                elif not mib:
                    mine["file"] = {"skipped": "not measured in --quick"}
                else:
                    log("%s: FileService %d MiB" % (key, mib))
                    try:
                        path = src
                        if mib != params.file_mib:
                            path = os.path.join(tmp, "payload-%d.bin" % mib)
                            with open(src, "rb") as a, open(path, "wb") as b:
                                b.write(a.read(mib << 20))
                            msvc.file_service.register(path)
                        mine["file"] = msvc.file_transfer(ctx, path, mib)
                    except Exception as exc:
                        mine["file"] = {"error": "%s: %s" % (type(exc).__name__, str(exc)[:200])}
            except Exception as exc:  # keep going: the other figures are still worth having
                mine["error"] = "%s: %s" % (type(exc).__name__, str(exc)[:300])
                log("msvc %s failed: %s" % (key, mine["error"]))
            finally:
                if ctx is not None:
                    msvc.stop(ctx)

            # mitogen, same target
            if "error" not in mito:
                log("%s: mitogen" % key)
                spec: Dict[str, Any] = {"params": params.as_dict(), "slow": slow, "calls": True,
                                        "boot_n": params.boot_n_slow if slow else params.boot_n}
                if target.is_ssh:
                    spec["ssh"] = target.ssh_spec()
                    spec["ssh_true_argv"] = target.ssh_true_argv()
                res["mitogen"][key] = run_mitogen_driver(mito, spec, tmp)
                if "error" in res["mitogen"][key]:
                    log("mitogen %s: %s" % (key, res["mitogen"][key]["error"]))
                if key == "ssh" and proxies is not None and params.tcp_bytes:
                    bspec = {"params": params.as_dict(), "boot_n": 1,
                             "ssh": target.ssh_spec(via=proxies.addresses[0])}
                    res["mitogen"][key]["tcp"] = tcp_bytes(
                        proxies, target, lambda: run_mitogen_driver(mito, bspec, tmp))
        res["goals"] = goals(res)
        res["meta"]["load_average_end"] = list(os.getloadavg())
    finally:
        log("cleaning up")
        if msvc is not None:
            try:
                msvc.close()
            except Exception as exc:
                log("router shutdown: %s" % exc)
        if proxies is not None:
            proxies.stop()
        if testbed is not None:
            testbed.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    text = report(res)
    print(header_text(res))
    print(text)
    if args.json:
        with open(args.json, "w") as fp:
            json.dump(res, fp, indent=2, sort_keys=True, default=str)
        log("wrote %s" % args.json)
    log("done")
    return 0


def tcp_bytes(proxies: ProxyProcess, target: Target, run: Callable[[], Any]) -> Dict[str, int]:
    """TCP payload bytes through the counting proxy for ``run()`` (connect,
    one call, disconnect), minus those of `ssh true` through it."""
    def measure(fn: Callable[[], Any]) -> tuple:
        proxies.wait_idle()
        before = proxies.stats()[0]
        fn()
        proxies.wait_idle()
        after = proxies.stats()[0]
        return (after["bytes_upstream"] - before["bytes_upstream"],
                after["bytes_downstream"] - before["bytes_downstream"])
    base = measure(lambda: subprocess.run(target.ssh_true_argv(via=proxies.addresses[0]),
                                          stdin=subprocess.DEVNULL, check=True, timeout=60))
    total = measure(run)
    return {"up": total[0] - base[0], "down": total[1] - base[1],
            "total_up": total[0], "ssh_true_up": base[0]}


def goals(res: Dict[str, Any]) -> Dict[str, Dict[str, str]]:
    ms = res["msvc"]
    out = {}
    rt = ms.get("local", {}).get("rt_ping", {})
    fn = ms.get("local", {}).get("rt_fn", {})
    if rt:
        out["no-op round trip, local pipes"] = {
            "goal": "< %.1f ms" % GOAL_RT_MS,
            "measured": "p50 %.3f ms (ping), %.3f ms (fn)" % (rt["p50_ms"], fn.get("p50_ms", 0))}
    boot = ms.get("local", {}).get("boot", {})
    if boot:
        out["bootstrap, local"] = {"goal": "< %.0f ms" % GOAL_BOOT_MS,
                                   "measured": "%.1f ms (python start-up alone %.1f ms)" % (
                                       boot["connect_ms"],
                                       res["baseline"]["local"]["python_ms"])}
    sboot = ms.get("ssh", {}).get("boot", {})
    if sboot:
        out["bootstrap over ssh, beyond ssh's own connect"] = {
            "goal": "< %.0f ms" % GOAL_BOOT_MS,
            "measured": "%.1f ms (connect %.1f ms, `ssh true` %.1f ms)" % (
                sboot["beyond_ssh_ms"], sboot["connect_ms"], sboot["ssh_true_ms"])}
    st = res["stage2"]
    out["bytes on the wire for bootstrap"] = {
        "goal": "< %d B" % GOAL_BOOT_BYTES,
        "measured": "%d B (stage 2 + config)" % (st["stage2_bytes"] + st.get("config_bytes", 0))}
    return out


def header_text(res: Dict[str, Any]) -> str:
    m = res["meta"]
    lines = ["# ansible_mitogen_svc runtime benchmark%s" % (" (--quick)" if m["quick"] else ""),
             "date: %s" % m["date"], "machine: %s; load average at start %s" % (
                 m["machine"], ", ".join("%.2f" % x for x in m["load_average"])),
             "controller python: %s" % m["controller_python"],
             "target python: %s" % m["target_python"]]
    mito = m.get("mitogen", {})
    if "version" in mito:
        lines.append("mitogen: %s from PyPI (%s)" % (mito["version"], mito["venv"]))
    else:
        lines.append("mitogen: not available (%s)" % mito.get("error"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
