"""The collection's own packages load with a bytecode cache (plugin_utils
``_bytecode``): ansible-core's collection loader would compile the runtime
from source at the start of every ansible-playbook run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(
    not Path(sys.executable).with_name("ansible-playbook").exists(),
    reason="ansible-core is not installed")

# Loads a strategy the way ansible-playbook does, then reports who loaded
# each of the collection's modules and which bytecode files exist.
SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder
    _AnsibleCollectionFinder(paths=[%r])._install()
    from ansible.plugins.loader import init_plugin_loader, strategy_loader
    init_plugin_loader([%r])
    strategy_loader.get("mitogen.svc.mitogen_linear", class_only=True)
    out = {}
    for name, mod in sorted(sys.modules.items()):
        if name.startswith("ansible_collections.mitogen.svc.") and getattr(mod, "__file__", None):
            path = mod.__file__
            cached = importlib.util.cache_from_source(path) if path.endswith(".py") else ""
            out[name] = [type(mod.__loader__).__name__, path, bool(cached) and
                         __import__("os").path.exists(cached)]
    print(json.dumps(out))
""")


def _copy_collection(tmp_path: Path) -> Path:
    coll = tmp_path / "ansible_collections" / "mitogen" / "svc"
    shutil.copytree(ROOT, coll, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "tests", "docs", "bench", "*.pyc"))
    return coll


def _load(tmp_path: Path, write_bytecode: bool) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    if not write_bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT % (str(tmp_path), str(tmp_path))],
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                         env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_runtime_and_plugin_utils_load_with_a_bytecode_cache(tmp_path: Path) -> None:
    coll = _copy_collection(tmp_path)
    first = _load(tmp_path, write_bytecode=True)
    runtime = [n for n in first if ".ansible_mitogen_svc" in n]
    utils = [n for n in first if ".plugins.plugin_utils._" in n and not n.endswith("_bytecode")]
    assert "ansible_collections.mitogen.svc.ansible_mitogen_svc.context" in runtime
    assert "ansible_collections.mitogen.svc.plugins.plugin_utils._strategy" in utils
    for name in runtime + utils:
        loader, path, cached = first[name]
        assert loader == "SourceFileLoader", name
        assert Path(path).is_relative_to(coll), (name, path)
        assert cached, "no bytecode written for %s" % name
    # A second run loads the same modules the same way (from the cache).
    assert _load(tmp_path, write_bytecode=True) == first


def test_no_bytecode_is_written_when_python_is_told_not_to(tmp_path: Path) -> None:
    _copy_collection(tmp_path)
    loaded = _load(tmp_path, write_bytecode=False)
    context = loaded["ansible_collections.mitogen.svc.ansible_mitogen_svc.context"]
    assert context[0] == "SourceFileLoader"
    assert not context[2]
    assert not list(tmp_path.rglob("*.pyc"))
