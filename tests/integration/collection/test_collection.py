"""The repository is the collection root: it builds with ansible-galaxy,
installs, and the runtime works when imported from the installed collection
(``ansible_collections.mitogen.svc.ansible_mitogen_svc``), shipping itself
to an agent under its canonical name."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
galaxy = Path(sys.executable).with_name("ansible-galaxy")
pytestmark = pytest.mark.skipif(not galaxy.exists(), reason="ansible-core is not installed")


def test_build_install_and_import(tmp_path: Path) -> None:
    out = subprocess.run([str(galaxy), "collection", "build", str(ROOT), "--output-path",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tarball = tmp_path / "mitogen-svc-0.1.0.tar.gz"
    assert tarball.exists()
    with tarfile.open(tarball) as tf:
        names = tf.getnames()
    assert "ansible_mitogen_svc/agent.py" in names
    assert "meta/runtime.yml" in names
    assert not [n for n in names if n.startswith(".venv") or "__pycache__" in n]

    dest = tmp_path / "collections"
    out = subprocess.run([str(galaxy), "collection", "install", str(tarball), "-p", str(dest)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    installed = dest / "ansible_collections" / "mitogen" / "svc"
    assert (installed / "ansible_mitogen_svc" / "bootstrap.py").exists()

    script = textwrap.dedent("""
        from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder
        _AnsibleCollectionFinder(paths=[%r])._install()
        from ansible_collections.mitogen.svc.ansible_mitogen_svc import Router, call, connect
        import ansible_collections.mitogen.svc.ansible_mitogen_svc.bootstrap as b
        assert b.__file__.startswith(%r), b.__file__
        router = Router()
        try:
            ctx = connect.local(router, python="/usr/bin/python3")
            info = call(ctx, "ansible_mitogen_svc.agent.AgentService", "info")
            print("OK", info["pid"] != 0)
        finally:
            router.shutdown()
            router.join()
    """) % (str(dest), str(installed))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK True"
