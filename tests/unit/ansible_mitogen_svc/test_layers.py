"""The layering rule of ansible_mitogen_svc (stated in its __init__.py),
checked on the source with ast, and the shipped module set imported in a
fresh isolated interpreter without ansible."""
from __future__ import annotations

import ast
import glob
import json
import os
import re
import subprocess
import sys
from typing import Dict, List, Set, Tuple

import pytest

import ansible_mitogen_svc
from ansible_mitogen_svc import bootstrap

pytestmark = pytest.mark.timeout(60)

PKG = "ansible_mitogen_svc"
PKG_DIR = os.path.dirname(os.path.abspath(ansible_mitogen_svc.__file__))
REPO = os.path.dirname(PKG_DIR)

#: Standard library modules that do I/O or keep time; "pure, sans-IO"
#: modules may not import them.
IO_MODULES = {"os", "posix", "io", "socket", "select", "selectors", "threading", "_thread",
              "time", "logging", "subprocess", "signal", "asyncio", "fcntl", "termios", "pty",
              "tempfile", "shutil", "pathlib", "multiprocessing", "concurrent", "queue"}


def _layers() -> Dict[str, int]:
    """module -> layer number, parsed from the package docstring's list."""
    doc = ansible_mitogen_svc.__doc__ or ""
    layers: Dict[str, int] = {}
    for m in re.finditer(r"^(\d)\.\s+[^:\n]+:\s+(.+)$", doc, re.M):
        for name in m.group(2).split(","):
            layers[name.strip()] = int(m.group(1))
    return layers


def _modules() -> List[str]:
    return sorted(f[:-3] for f in os.listdir(PKG_DIR)
                  if f.endswith(".py") and f != "__init__.py")


def _imports(module: str) -> Tuple[Set[str], Set[str]]:
    """(package modules, other top-level modules) imported anywhere in
    ``module``, including imports inside functions."""
    path = os.path.join(PKG_DIR, "__init__.py" if module == PKG else module + ".py")
    with open(path, encoding="utf-8") as fp:
        tree = ast.parse(fp.read(), path)
    own: Set[str] = set()
    other: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    own.add(alias.name[len(PKG) + 1:].split(".")[0] or PKG)
                else:
                    other.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                other.add("<relative import beyond the package>")
            elif node.level == 1 or (node.module or "").split(".")[0] == PKG:
                mod = node.module or ""
                if node.level == 0:
                    mod = mod[len(PKG) + 1:]
                if mod:
                    own.add(mod.split(".")[0])
                else:  # from . import a, b
                    own.update(alias.name for alias in node.names)
            else:
                other.add((node.module or "").split(".")[0])
    return own, other


def test_every_module_has_a_layer() -> None:
    layers = _layers()
    assert set(layers.values()) == {1, 2, 3}, "cannot parse the layer list: %r" % layers
    missing = [m for m in _modules() if m not in layers]
    assert not missing, "modules not assigned a layer in %s/__init__.py: %s" % (PKG, missing)


def test_pure_modules_import_only_pure_modules() -> None:
    layers = _layers()
    problems = []
    for mod in _modules():
        if layers.get(mod) != 1:
            continue
        own, other = _imports(mod)
        for dep in sorted(own):
            if layers.get(dep) != 1:
                problems.append("%s (pure) imports %s (layer %s)" % (mod, dep, layers.get(dep)))
        for dep in sorted(other & IO_MODULES):
            problems.append("%s (pure) imports %s, which does I/O" % (mod, dep))
    assert not problems, "\n".join(problems)


def test_imports_never_flow_upwards() -> None:
    layers = _layers()
    problems = []
    for mod in _modules():
        if mod not in layers:
            continue
        own, _ = _imports(mod)
        for dep in sorted(own):
            if dep in layers and layers[dep] > layers[mod]:
                problems.append("%s (layer %d) imports %s (layer %d)"
                                % (mod, layers[mod], dep, layers[dep]))
    assert not problems, "\n".join(problems)


def test_nothing_imports_ansible() -> None:
    offenders = []
    for mod in [PKG] + _modules():
        _, other = _imports(mod)
        bad = other & {"ansible", "ansible_collections", "<relative import beyond the package>"}
        if bad:
            offenders.append("%s imports %s" % (mod, sorted(bad)))
    assert not offenders, "\n".join(offenders)


def test_shipped_set_is_closed_under_imports() -> None:
    shipped = {name[len(PKG) + 1:] or PKG for name in bootstrap.SHIPPED_MODULES}
    assert PKG in shipped
    problems = []
    for mod in sorted(shipped):
        own, _ = _imports(mod)
        for dep in sorted(own - shipped):
            problems.append("shipped %s imports %s, which is not shipped" % (mod, dep))
    assert not problems, "\n".join(problems)


# -- the shipped set, imported for real --------------------------------------------------
_PROBE = r"""
import importlib, json, sys
repo = sys.argv[1]
sys.path[:] = [repo] + [p for p in sys.path
                        if p and "site-packages" not in p and "dist-packages" not in p]

class NoAnsible(object):
    attempts = []
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ansible", "ansible_collections"):
            self.attempts.append(name)
            raise ImportError("ansible is blocked in this probe")
        return None

sys.meta_path.insert(0, NoAnsible())
before = set(sys.modules)
import ansible_mitogen_svc.bootstrap as bootstrap
errors = {}
for name in bootstrap.SHIPPED_MODULES:
    try:
        importlib.import_module(name)
    except Exception as exc:
        errors[name] = "%s: %s" % (type(exc).__name__, exc)
loaded = sorted(set(sys.modules) - before)
files = sorted({getattr(sys.modules[n], "__file__", None) or "" for n in loaded
                if n.split(".")[0] == "ansible_mitogen_svc"})
std = getattr(sys, "stdlib_module_names", None)
foreign = sorted(n for n in loaded if n.split(".")[0] != "ansible_mitogen_svc"
                 and std is not None and n.split(".")[0] not in std)
print(json.dumps({"version": list(sys.version_info[:2]), "errors": errors,
                  "attempts": NoAnsible.attempts, "foreign": foreign, "files": files,
                  "shipped": list(bootstrap.SHIPPED_MODULES), "flags_isolated": sys.flags.isolated}))
"""


def _interpreters() -> List[str]:
    found = {os.path.realpath(sys.executable): sys.executable}
    for minor in range(8, 14):
        for path in sorted(glob.glob("/root/.pyenv/versions/3.%d.*/bin/python3" % minor))[-1:]:
            if os.access(path, os.X_OK):
                found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


@pytest.mark.parametrize("python", _interpreters())
def test_shipped_modules_import_in_a_fresh_isolated_interpreter(python: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    proc = subprocess.run([python, "-I", "-c", _PROBE, REPO], capture_output=True, text=True,
                          timeout=30, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["flags_isolated"] == 1
    assert out["errors"] == {}, out["errors"]
    assert out["attempts"] == [], "tried to import %s" % out["attempts"]
    assert out["foreign"] == [], "non-stdlib modules loaded: %s" % out["foreign"]
    assert all(f.startswith(PKG_DIR + os.sep) for f in out["files"]), out["files"]
    assert len(out["files"]) >= len(out["shipped"])
