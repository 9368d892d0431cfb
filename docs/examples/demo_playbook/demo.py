"""The README's main command (``bash scripts/demo.sh``): one playbook under
vanilla Ansible and under mitogen.svc, timed side by side.

It starts a small loopback sshd test bed (tests/lib/testbed.py: 3 hosts on
127.0.1.x, root logins; where sshd cannot run here, 3 inventory hosts with
``ansible_connection=local`` instead), runs ``site.yml`` beside this file
once under the builtin ``linear`` strategy (pipelining on, ControlPersist
as Ansible ships it) and once under ``mitogen.svc.mitogen_linear``, prints
the wall time and controller CPU of each run, their ratio, and whether
every task gave the same result on every host. Then it stops everything it
started: the test bed, vanilla's ssh ControlPersist masters, the mux and
its agents (bench/_ansible_wrap.py runs each ansible-playbook and ends
what it leaves behind).

Usage: ``python docs/examples/demo_playbook/demo.py [--hosts N] [--ansible-bin DIR]``
(scripts/demo.sh runs it with the demo venv, which has ansible-core).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path[:0] = [os.path.join(ROOT, "bench"), os.path.join(ROOT, "tests", "lib")]

from _ansible_run import (LABELS, Run, Workspace, ansible_version, compare,  # noqa: E402
                          find_ansible_bin)

PLAYBOOK = os.path.join(HERE, "site.yml")


def say(text: str) -> None:
    print(text, flush=True)


def start_targets(workdir: str, count: int) -> Tuple[Any, List[dict], str]:
    """(testbed or None, inventory hosts, description)."""
    try:
        from testbed import Testbed  # type: ignore[import-not-found]
        ok, why = Testbed.available()
    except ImportError as exc:
        ok, why = False, str(exc)
    if ok:
        try:
            bed = Testbed(os.path.join(workdir, "testbed"), count=count).start()
        except Exception as exc:  # e.g. no free 127.0.1.x port: fall back
            ok, why = False, "test bed failed to start: %s" % exc
    if not ok:
        hosts = [{"name": "local%d" % i, "local": True} for i in range(1, count + 1)]
        return None, hosts, ("%d local targets (ansible_connection=local; no sshd test bed: "
                             "%s)" % (count, why))
    hosts = [{"name": h.name, "address": h.address, "port": h.port, "key": str(h.key_path),
              "known_hosts": str(h.known_hosts_path)} for h in bed.hosts]
    where = ", ".join("%s:%d" % (h.address, h.port) for h in bed.hosts)
    return bed, hosts, "%d loopback sshd hosts, root logins (%s)" % (count, where)


def row(name: str, a: str, b: str) -> str:
    return "  %-26s %-18s %s" % (name, a, b)


def recap(run: Run) -> Tuple[str, str]:
    t = run.totals()
    return ("%d / %d" % (t.get("ok", 0), t.get("changed", 0)),
            "%d / %d" % (t.get("failures", 0), t.get("unreachable", 0)))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=3, help="targets (default %(default)s)")
    ap.add_argument("--ansible-bin", help="directory holding ansible-playbook")
    args = ap.parse_args(argv)
    bin_dir = find_ansible_bin(args.ansible_bin)
    if bin_dir is None:
        say("ansible-playbook not found (scripts/demo.sh installs it into .venv/demo)")
        return 2
    tasks = sum(1 for line in open(PLAYBOOK) if line.lstrip().startswith("- name:")) - 1
    workdir = tempfile.mkdtemp(prefix="msvc-demo-")
    os.chmod(workdir, 0o755)  # the test bed's users must traverse it
    remote_root = "/tmp/msvc-demo-%d" % os.getpid()
    bed = None
    runs = {}
    try:
        say("mitogen.svc demo: %s (%d tasks), %s" % (os.path.relpath(PLAYBOOK, ROOT), tasks,
                                                    ansible_version(bin_dir)))
        t0 = time.monotonic()
        bed, hosts, where = start_targets(workdir, args.hosts)
        say("targets: %s, ready in %.1f s" % (where, time.monotonic() - t0))
        ws = Workspace(os.path.join(workdir, "ws"), bin_dir, forks=max(5, args.hosts))
        ws.write_inventory(hosts)
        for strategy in ("vanilla", "mitogen"):
            say("running under %s ..." % LABELS[strategy])
            run = ws.run(strategy, [PLAYBOOK, "-e", "demo_root=%s" % remote_root], timeout=600)
            runs[strategy] = run
            if not run.ok:
                say("  failed:\n%s" % run.failure())
            else:
                say("  done in %.2f s" % run.wall_s)
    finally:
        if bed is not None:
            bed.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(remote_root, ignore_errors=True)

    v, m = runs["vanilla"], runs["mitogen"]
    say("")
    say(row("", LABELS["vanilla"], LABELS["mitogen"]))
    say(row("wall time", "%.2f s" % v.wall_s, "%.2f s" % m.wall_s))
    say(row("controller CPU", "%.2f s" % v.cpu_s, "%.2f s" % m.cpu_s))
    say(row("tasks ok / changed", *(x[0] for x in (recap(v), recap(m)))))
    say(row("failed / unreachable", *(x[1] for x in (recap(v), recap(m)))))
    say("")
    if v.wall_s and m.wall_s:
        say("mitogen_linear / vanilla linear wall time: %.2fx (%.2fx as fast)"
            % (m.wall_s / v.wall_s, v.wall_s / m.wall_s))
    if not (v.ok and m.ok):
        say("task results: not compared, a run failed")
        return 1
    diff = compare(v, m)
    if diff is None:
        say("task results: the same on every host (%d results, %d hosts)"
            % (len(v.results), len(hosts)))
        return 0
    say("task results: DIFFERENT: %s" % diff)
    return 1


if __name__ == "__main__":
    sys.exit(main())
