#!/usr/bin/env python3
"""Ansible benchmark: vanilla ``linear`` against ``mitogen.svc.mitogen_linear``.

Run from the repository root (root and /usr/sbin/sshd needed)::

    python bench/ansible.py [--quick] [--json out.json] [--markdown out.md] [--svg chart.svg]
    python bench/ansible.py --chart-from out.json --svg chart.svg [--markdown out.md]

It starts a tests/lib/testbed.py test bed (10 loopback sshd hosts, 3 with
``--quick``), puts one tests/lib/latency_proxy.py proxy in front of each
host, and runs bench/playbooks/bench.yml (40 tasks) once per round under
each strategy, vanilla with pipelining and ControlPersist, through the
proxies at 0 ms and at 20 ms added round trip, rounds alternating which
strategy goes first. Then ``ansible HOST -m ping`` on one host, the same
way. For every run it measures wall time, controller CPU (every process
of the run, see _ansible_wrap.py), target CPU (every process under the
hosts' sshd, see _ansible_target.py), bytes through the proxies and round
trips (up bursts, see _ansible_proxy.py), checks that both strategies gave
the same task results, and prints a markdown table of medians with
mitogen/vanilla ratios next to the goals of the issue. It reports, it never
asserts. Everything it starts is stopped before it exits.

Benchmark only, controller side, stdlib only: Ansible runs in its own
processes from a venv (``--ansible-bin``, default: the repository's
.venv/test or .venv/demo, see scripts/venv.sh).
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
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _ansible_proxy import Proxies  # noqa: E402
from _ansible_report import markdown, summarise, svg  # noqa: E402
from _ansible_run import (BENCH_DIR, LABELS, REPO, TARGET_PYTHON, TESTS_LIB, Run,  # noqa: E402
                          Workspace, ansible_version, collection_state, compare,
                          find_ansible_bin)
from _ansible_target import TargetMeter  # noqa: E402
from _measure import os_name  # noqa: E402

PLAYBOOK = os.path.join(BENCH_DIR, "playbooks", "bench.yml")
T0 = time.perf_counter()


def log(text: str) -> None:
    sys.stderr.write("[%6.1fs] %s\n" % (time.perf_counter() - T0, text))
    sys.stderr.flush()


class Params:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        self.hosts = args.hosts or (3 if args.quick else 10)
        self.rounds = args.rounds or (1 if args.quick else 2)
        self.ping_reps = args.ping_reps or (1 if args.quick else 5)
        self.rtts_ms = [float(x) for x in args.rtt.split(",")]
        self.warmup = not args.quick
        self.collection = os.path.abspath(args.collection or REPO)

    def as_dict(self) -> Dict[str, Any]:
        return dict(vars(self))


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("signal %d" % signum)


def target_python() -> str:
    try:
        r = subprocess.run([TARGET_PYTHON, "-c", "import sys; print(sys.version.split()[0])"],
                           capture_output=True, text=True, timeout=30)
        return "%s %s" % (TARGET_PYTHON, r.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return TARGET_PYTHON


class Bench:
    """The test bed, proxies and workspace of one benchmark run."""

    def __init__(self, params: Params, bin_dir: str, tmp: str) -> None:
        self.params = params
        self.tmp = tmp
        self.testbed: Any = None
        self.proxies: Optional[Proxies] = None
        self.ws = Workspace(os.path.join(tmp, "ws"), bin_dir, forks=params.hosts,
                            collection=params.collection)
        self.remote_root = "/tmp/msvc-ansible-bench-targets-%d" % os.getpid()
        self.big = os.path.join(tmp, "big.bin")
        with open(self.big, "wb") as fp:
            fp.write(os.urandom(1 << 20))
        self.meter: Optional[TargetMeter] = None

    def start(self) -> None:
        if TESTS_LIB not in sys.path:
            sys.path.insert(0, TESTS_LIB)
        from testbed import Testbed  # type: ignore[import-not-found]
        ok, why = Testbed.available()
        if not ok:
            raise SystemExit("cannot run: %s" % why)
        log("starting %d sshd hosts" % self.params.hosts)
        self.testbed = Testbed(os.path.join(self.tmp, "testbed"), self.params.hosts).start()
        hosts = self.testbed.hosts
        self.proxies = Proxies([(h.address, h.port) for h in hosts], 0.0)
        self.ws.write_inventory([
            {"name": h.name, "address": addr, "port": port, "key": str(h.key_path),
             "known_hosts": str(h.known_hosts_path), "alias": "[%s]:%d" % (h.address, h.port)}
            for h, (addr, port) in zip(hosts, self.proxies.addresses)])
        self.meter = TargetMeter([h.pid for h in hosts])

    def stop(self) -> None:
        if self.proxies is not None:
            self.proxies.stop()
        if self.testbed is not None:
            self.testbed.stop()
        shutil.rmtree(self.remote_root, ignore_errors=True)

    def set_rtt(self, rtt_ms: float) -> None:
        assert self.proxies is not None
        self.proxies.set_delay(rtt_ms / 2000.0)

    def playbook_args(self) -> List[str]:
        return [PLAYBOOK, "-e", "bench_root=%s" % self.remote_root, "-e", "big_src=%s" % self.big]

    def measure(self, strategy: str, tool: str, args: List[str]) -> Dict[str, Any]:
        """One wrapped run with target CPU and proxy counters around it."""
        assert self.proxies is not None and self.meter is not None
        self.proxies.wait_idle()
        self.meter.wait_quiet()
        cpu0, _ = self.meter.sample()
        p0 = self.proxies.totals()
        run = self.ws.run(strategy, args, tool=tool)
        idle = self.proxies.wait_idle()
        quiet = self.meter.wait_quiet()
        cpu1, extra = self.meter.sample()
        p1 = self.proxies.totals()
        d = {k: p1.get(k, 0) - p0.get(k, 0) for k in p1 if k != "connections_active"}
        hosts = len({e.get("host") for e in run.results}) or 1
        tasks = run.tasks_per_host()
        out: Dict[str, Any] = {
            "strategy": strategy, "rc": run.rc, "ok": run.ok,
            "wall_s": run.wall_s, "controller_cpu_s": run.cpu_s,
            "controller_user_s": run.wrap.get("user_s"), "controller_sys_s": run.wrap.get("sys_s"),
            "teardown_s": run.wrap.get("teardown_s"),
            "masters_terminated": run.wrap.get("masters_terminated"),
            "target_cpu_s": cpu1 - cpu0,
            "bytes_up": d.get("bytes_upstream", 0), "bytes_down": d.get("bytes_downstream", 0),
            "connections": d.get("connections_total", 0),
            "up_bursts": d.get("up_bursts", 0), "down_bursts": d.get("down_bursts", 0),
            "hosts": hosts, "tasks_per_host": tasks,
            "round_trips_per_task": (d.get("up_bursts", 0) / (hosts * tasks)) if tasks else None,
            "recap": run.totals(),
        }
        if not idle or not quiet:
            out["not_quiet"] = {"proxy_idle": idle, "target_leftovers": extra}
        if run.wrap.get("killed"):
            out["killed"] = run.wrap["killed"]
        if not run.ok:
            out["failure"] = run.failure()[-2000:]
            log("%s %s failed: %s" % (strategy, tool, run.failure()[-1500:]))
        out["_run"] = run
        return out


def run_scenario(bench: Bench, key: str, tool: str, args: List[str], reps: int,
                 res: Dict[str, Any], label: str, rtt_ms: float) -> None:
    sc = res["scenarios"].setdefault(key, {"label": label, "rtt_ms": rtt_ms, "tool": tool,
                                           "runs": {"vanilla": [], "mitogen": []}})
    reference: Optional[Run] = None
    for r in range(reps):
        order = ["vanilla", "mitogen"] if r % 2 == 0 else ["mitogen", "vanilla"]
        for strategy in order:
            m = bench.measure(strategy, tool, args)
            m["round"] = r + 1
            m["seq"] = bench.ws.count
            run = m["_run"]
            if strategy == "vanilla" and reference is None and run.ok:
                reference = run
            sc["runs"][strategy].append(m)
            log("%s round %d %-7s wall %6.2f s  ctl cpu %6.2f s  target cpu %6.2f s  "
                "%5.2f MB  %5.1f rt/task" % (key, r + 1, strategy, m["wall_s"],
                                             m["controller_cpu_s"], m["target_cpu_s"],
                                             (m["bytes_up"] + m["bytes_down"]) / 1e6,
                                             m["round_trips_per_task"] or 0.0))
    # Task results: every run against the first successful vanilla run.
    for strategy in ("vanilla", "mitogen"):
        for m in sc["runs"][strategy]:
            run = m.pop("_run")
            if reference is None:
                m["results_match"] = None
            elif run is reference:
                m["results_match"] = True
            else:
                diff = compare(reference, run)
                m["results_match"] = diff is None
                if diff:
                    m["results_diff"] = diff


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 hosts, 1 round, 1 ping each, no warm-up (a few minutes)")
    ap.add_argument("--hosts", type=int, help="testbed hosts (default 10, --quick 3)")
    ap.add_argument("--rounds", type=int, help="playbook rounds per RTT (default 2, --quick 1)")
    ap.add_argument("--ping-reps", type=int, help="ping runs per strategy and RTT (default 5)")
    ap.add_argument("--rtt", default="0,20", help="added round trips in ms (default %(default)s)")
    ap.add_argument("--ansible-bin", help="directory holding ansible-playbook")
    ap.add_argument("--collection", metavar="DIR",
                    help="the mitogen.svc collection to measure (default: this checkout), "
                         "e.g. a `git worktree` of a commit while the checkout is being edited")
    ap.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    ap.add_argument("--svg", metavar="FILE", help="write a chart of the ratios")
    ap.add_argument("--chart-from", metavar="JSON",
                    help="no benchmark: render --svg/--markdown from an earlier --json")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (debugging)")
    args = ap.parse_args(argv)

    if args.chart_from:
        with open(args.chart_from) as fp:
            write_outputs(json.load(fp), args, quiet=False)
        return 0

    signal.signal(signal.SIGTERM, _raise_interrupt)
    params = Params(args)
    bin_dir = find_ansible_bin(args.ansible_bin)
    if bin_dir is None:
        print("no ansible-playbook found: run `bash scripts/test.sh tests/unit` once "
              "(creates .venv/test) or pass --ansible-bin", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="msvc-ansible-bench-")
    os.chmod(tmp, 0o755)
    res: Dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": "%s, %d cores, %s" % (os_name(), os.cpu_count() or 0, platform.machine()),
            "load_average": list(os.getloadavg()),
            "ansible": ansible_version(bin_dir),
            "target_python": target_python(),
            "params": params.as_dict(),
            "collection": collection_state(params.collection),
            "playbook": os.path.relpath(PLAYBOOK, os.path.dirname(BENCH_DIR)),
            "labels": LABELS,
        },
        "scenarios": {},
    }
    bench = Bench(params, bin_dir, tmp)
    started = time.perf_counter()
    try:
        run_all(bench, params, res)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        log("stopping the test bed and proxies")
        bench.stop()
        if args.keep:
            log("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["meta"]["duration_s"] = time.perf_counter() - started
    res["meta"]["load_average_end"] = list(os.getloadavg())
    summarise(res)
    write_outputs(res, args, quiet=False)
    log("done in %.0f s" % res["meta"]["duration_s"])
    return 0


def run_all(bench: Bench, params: Params, res: Dict[str, Any]) -> None:
    """Warm-up, then the playbook at each RTT, then ping at each RTT."""
    bench.start()
    if params.warmup:
        log("warm-up: one unmeasured playbook run on host1 per strategy")
        bench.set_rtt(0.0)
        for strategy in ("vanilla", "mitogen"):
            m = bench.measure(strategy, "ansible-playbook",
                              bench.playbook_args() + ["--limit", "host1"])
            m.pop("_run")
            res.setdefault("warmup", []).append(m)
    else:
        log("warm-up: one unmeasured ping per strategy")
        bench.set_rtt(0.0)
        for strategy in ("vanilla", "mitogen"):
            bench.measure(strategy, "ansible", ["host1", "-m", "ping"]).pop("_run")
    for rtt in params.rtts_ms:
        bench.set_rtt(rtt)
        run_scenario(bench, "playbook_%gms" % rtt, "ansible-playbook", bench.playbook_args(),
                     params.rounds, res,
                     "playbook, %d hosts, %g ms RTT" % (params.hosts, rtt), rtt)
    for rtt in params.rtts_ms:
        bench.set_rtt(rtt)
        run_scenario(bench, "ping_%gms" % rtt, "ansible", ["host1", "-m", "ping"],
                     params.ping_reps, res, "ansible -m ping, 1 host, %g ms RTT" % rtt, rtt)


def write_outputs(res: Dict[str, Any], args: argparse.Namespace, quiet: bool) -> None:
    text = markdown(res)
    if not quiet:
        print(text)
    if getattr(args, "json", None):
        with open(args.json, "w") as fp:
            json.dump(res, fp, indent=2, sort_keys=True)
            fp.write("\n")
        log("wrote %s" % args.json)
    if args.markdown:
        with open(args.markdown, "w") as fp:
            fp.write(text + "\n")
        log("wrote %s" % args.markdown)
    if args.svg:
        with open(args.svg, "w") as fp:
            fp.write(svg(res))
        log("wrote %s" % args.svg)


if __name__ == "__main__":
    sys.exit(main())
