"""The mitogen (PyPI) side column of bench/runtime.py.

Benchmark only, controller side. ``ensure_mitogen`` makes a private venv
with mitogen; ``run_mitogen_driver`` runs runtime.py --mitogen-driver with
that venv's python, which calls ``mitogen_driver_main``. That child imports
this module too: keep it stdlib-only at module level (mitogen is imported
inside ``mitogen_driver_main`` only).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from _measure import (BENCH_DIR, RUNTIME_SCRIPT, TARGET_PYTHON, THREADS, concurrent_rate, log,
                      median, round_trips, timed_command)


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
    """Run runtime.py with mitogen's venv python in --mitogen-driver mode."""
    err_path = os.path.join(tmp, "mitogen-driver.stderr")
    with open(err_path, "w") as err:
        try:
            r = subprocess.run([mito["python"], RUNTIME_SCRIPT, "--mitogen-driver",
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
