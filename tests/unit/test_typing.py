"""The runtime type-checks under mypy with disallow_untyped_defs (.mypy.ini)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_runtime_passes_mypy() -> None:
    pytest.importorskip("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / ".mypy.ini")],
                         cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
