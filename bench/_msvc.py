"""Measures ansible_mitogen_svc (this project's runtime) for bench/runtime.py.

Benchmark only, controller side. The runtime is imported when ``Msvc`` is
created, never at module level, so the mitogen driver can import
runtime.py (and so this module) without it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from _measure import (BENCH_DIR, REPO_ROOT, TARGET_PYTHON, THREADS, concurrent_rate, median,
                      round_trips, timed_command, wchar)
from _targets import Target

if TYPE_CHECKING:
    from runtime import Params

AGENT = "ansible_mitogen_svc.agent.AgentService"


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
                    self.bootstrap.first_stage_argv(TARGET_PYTHON)))}

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

    def bootstrap_series(self, target: Target, n: int,
                         via: Optional[tuple] = None) -> Dict[str, Any]:
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
