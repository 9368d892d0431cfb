"""``bash scripts/demo.sh --runtime`` (the README's main command before it
ran a playbook): the FileService example of docs/services.md against a
real agent.

It starts a loopback sshd target from the test bed (tests/lib/testbed.py)
when it can (root, openssh-server installed), else a local agent; registers
a few files on the controller; and has the agent download them by calling
back the controller's FileService. Prints what happened and how long each
step took.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, HERE, os.path.join(ROOT, "tests", "lib")]

from ansible_mitogen_svc import Pool, Router, call, connect  # noqa: E402
from ansible_mitogen_svc.files import FileService  # noqa: E402

import file_service  # noqa: E402


def start_target(router: Router, workdir: str) -> Tuple[Any, Any, str]:
    """An agent over ssh to a loopback sshd, or a local agent."""
    try:
        import testbed
        ok, why = testbed.Testbed.available()
    except ImportError as exc:
        ok, why = False, str(exc)
    if ok:
        bed = testbed.Testbed(os.path.join(workdir, "testbed"), count=1)
        bed.start()
        host = bed.hosts[0]
        t0 = time.monotonic()
        agent = connect.ssh(router, host.address, username="root", port=host.port,
                            ssh_args=host.ssh_options(), python="/usr/bin/python3",
                            extra_modules=["file_service"])
        return agent, bed, "ssh root@%s:%d (%.0f ms to bootstrap)" % (
            host.address, host.port, (time.monotonic() - t0) * 1000)
    t0 = time.monotonic()
    agent = connect.local(router, python="/usr/bin/python3", extra_modules=["file_service"])
    return agent, None, "local agent, sshd unavailable: %s (%.0f ms to bootstrap)" % (
        why, (time.monotonic() - t0) * 1000)


def main() -> int:
    router = Router()
    pool = Pool(router, [FileService], size=4)
    bed = None
    with tempfile.TemporaryDirectory(prefix="msvc-demo-") as workdir:
        try:
            agent, bed, how = start_target(router, workdir)
            info = call(agent, "ansible_mitogen_svc.agent.AgentService", "info")
            print("target: %s" % how)
            print("agent: pid %d, Python %s, fork parent pid %s"
                  % (info["pid"], ".".join(map(str, info["python"])), info["fork_parent_pid"]))
            big = os.path.join(workdir, "random-32MiB.bin")
            with open(big, "wb") as fp:
                for _ in range(32):
                    fp.write(os.urandom(1 << 20))
            paths: List[str] = ["/etc/os-release", big]
            dest_dir = os.path.join(workdir, "downloads")
            os.makedirs(dest_dir)
            t0 = time.monotonic()
            results = file_service.run(agent, paths, pool.get(FileService.name), dest_dir)
            elapsed = time.monotonic() - t0
            for r in results:
                print("  %(path)s: %(size)d bytes, sha256 %(sha256).16s..., intact=%(intact)s" % r)
            total = sum(r["size"] for r in results)
            print("downloaded %d files, %.1f MiB in %.2f s" % (len(results), total / 2**20, elapsed))
            return 0 if all(r["intact"] for r in results) else 1
        finally:
            pool.stop()
            router.shutdown()
            router.join()
            if bed is not None:
                bed.stop()


if __name__ == "__main__":
    sys.exit(main())
