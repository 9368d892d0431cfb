"""Runnable example from docs/services.md: an agent downloads files that the
controller registered, by calling back the controller's FileService.

This module is both the controller-side script and the module shipped to the
agent (``extra_modules=["file_service"]``): only :func:`download` runs there.

Run from a checkout: PYTHONPATH=. python3 docs/examples/file_service.py FILE...
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from typing import Any, Dict, List


def download(path: str, dest: str) -> Dict[str, Any]:
    """Runs on the agent: pull ``path`` from the controller into ``dest``."""
    from ansible_mitogen_svc import current_call
    from ansible_mitogen_svc.files import get_file

    meta = get_file(current_call().parent, path, dest, timeout=300.0)
    digest = hashlib.sha256()
    with open(dest, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            digest.update(block)
    return {"path": path, "dest": dest, "size": meta["size"], "sha256": digest.hexdigest(),
            "agent_pid": os.getpid()}


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(agent: Any, paths: List[str], service: Any, dest_dir: str) -> List[Dict[str, Any]]:
    """Register ``paths`` with ``service`` and have ``agent`` download each."""
    import file_service  # this module, under the name it is shipped as
    results = []
    for i, path in enumerate(paths):
        service.register(path)
        dest = os.path.join(dest_dir, "%d-%s" % (i, os.path.basename(path)))
        result = agent.call(file_service.download, path, dest)
        result["intact"] = result["sha256"] == sha256_of(path)
        results.append(result)
    return results


def main(argv: List[str]) -> int:
    from ansible_mitogen_svc import Pool, Router, connect
    from ansible_mitogen_svc.files import FileService

    paths = [os.path.abspath(p) for p in argv] or ["/etc/os-release"]
    router = Router()
    pool = Pool(router, [FileService], size=4)
    try:
        agent = connect.local(router, python="/usr/bin/python3", extra_modules=["file_service"])
        with tempfile.TemporaryDirectory() as dest_dir:
            for r in run(agent, paths, pool.get(FileService.name), dest_dir):
                print("%(path)s -> %(dest)s: %(size)d bytes, sha256 %(sha256)s, intact=%(intact)s" % r)
    finally:
        pool.stop()
        router.shutdown()
        router.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
