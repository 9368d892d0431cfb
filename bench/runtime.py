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

Benchmark only, controller side. This file holds the parameters, the
command line and the run order; the work is in the modules beside it:
_measure.py (shared settings and timing helpers), _targets.py (transports
and the latency proxy child), _msvc.py (measuring ansible_mitogen_svc),
_mitogen.py (measuring mitogen) and _report.py (the printed tables).
This file and those modules must stay importable without
ansible_mitogen_svc on the path and without mitogen (the driver mode
imports only mitogen, the main mode only the runtime): imports of either
happen inside functions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

# The helper modules live beside this file; make them importable however
# it is started (as a script, by the mitogen venv's python, with -m).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import TARGET_PYTHON, TESTS_LIB, log, os_name, timed_command  # noqa: E402
from _mitogen import ensure_mitogen, mitogen_driver_main, run_mitogen_driver  # noqa: E402
from _msvc import Msvc  # noqa: E402
from _report import goals, header_text, report  # noqa: E402
from _targets import ProxyProcess, Target, proxy_server_main, tcp_bytes  # noqa: E402

LATENCY_ONE_WAY = 0.005  # seconds each way: 10 ms round trip
DEFAULT_VENV = os.path.join(tempfile.gettempdir(), "msvc-bench-mitogen-venv-py%d.%d"
                            % sys.version_info[:2])


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


def python_version(py: str) -> str:
    try:
        r = subprocess.run([py, "-c", "import sys; print(sys.version.split()[0])"],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or "?"
    except OSError:
        return "missing"


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


if __name__ == "__main__":
    sys.exit(main())
