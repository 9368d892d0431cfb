"""What the strategies prepare in ansible-playbook before workers fork is
really what workers then use: a cache filled under another key than the one
ansible-core looks up would cost every worker the full work again."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(
    not Path(sys.executable).with_name("ansible-playbook").exists(),
    reason="ansible-core is not installed")


def test_result_field_cache_is_warm_for_ansibles_own_calls(tmp_path: Path) -> None:
    svc = tmp_path / "ansible_collections" / "mitogen"
    svc.mkdir(parents=True)
    (svc / "svc").symlink_to(ROOT)
    script = textwrap.dedent("""
        from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder
        _AnsibleCollectionFinder(paths=[%r])._install()
        try:
            from ansible._internal._task import UnifiedTaskResult
        except ImportError:
            print("SKIP no UnifiedTaskResult in this ansible-core")
            raise SystemExit(0)
        from ansible.plugins.loader import init_plugin_loader
        init_plugin_loader([%r])
        from ansible_collections.mitogen.svc.plugins.plugin_utils import _strategy
        _strategy._preload_plugins()
        cached = UnifiedTaskResult.__dict__["get_result_key_to_resolved_field_mapping"].__func__
        before = cached.cache_info()
        # What ansible-core's _from_result_dict() calls for every result:
        for source_is_module in (False, True):
            UnifiedTaskResult.get_result_key_to_resolved_field_mapping(
                source_is_module=source_is_module)
        after = cached.cache_info()
        print("MISSES", after.misses - before.misses, "HITS", after.hits - before.hits)
    """) % (str(tmp_path), str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert out.stdout.strip() == "MISSES 0 HITS 2"


def test_workers_import_nothing_for_a_module_task(tmp_path: Path) -> None:
    """What every module task's worker loads (the serialization profiles of
    its arguments and result, the ``normal`` action, the ``sh`` shell) is
    already imported when workers fork."""
    svc = tmp_path / "ansible_collections" / "mitogen"
    svc.mkdir(parents=True)
    (svc / "svc").symlink_to(ROOT)
    script = textwrap.dedent("""
        import sys
        from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder
        _AnsibleCollectionFinder(paths=[%r])._install()
        from ansible.plugins.loader import init_plugin_loader, action_loader, get_shell_plugin
        init_plugin_loader([%r])
        from ansible_collections.mitogen.svc.plugins.plugin_utils import _strategy
        _strategy._preload_plugins()
        before = set(sys.modules)
        # What a worker calls for a task with a module and no action plugin:
        action_loader.get("ansible.legacy.normal", class_only=True)
        get_shell_plugin(shell_type="sh", executable="/bin/sh")
        try:
            from ansible.module_utils.common.json import Direction, get_module_encoder
            from ansible.module_utils.common.json import get_module_decoder
        except ImportError:  # ansible-core 2.18: no serialization profiles
            pass
        else:
            get_module_encoder("legacy", Direction.CONTROLLER_TO_MODULE)
            get_module_decoder("legacy", Direction.MODULE_TO_CONTROLLER)
        print("NEW", sorted(set(sys.modules) - before))
    """) % (str(tmp_path), str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "NEW []"
