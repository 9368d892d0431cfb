"""Functions that bench/runtime.py calls on agents.

Runs on: targets (shipped with ``extra_modules=["_bench_remote"]`` to
ansible_mitogen_svc agents, and served on demand to mitogen children by
mitogen's module responder). Controller side it is only imported so that
function references can be passed to ``Context.call``.

Keep it small and stdlib-only at module level: its size counts in what
mitogen ships for its first call, and mitogen scans a module's ``import``
statements to preload what it names. The runtime is therefore imported
with ``importlib`` inside the one function that needs it.
"""
from __future__ import annotations

import importlib
import os
import time
from typing import Any, Dict


def noop() -> None:
    """The no-op call: does nothing, returns None."""
    return None


def pid() -> int:
    return os.getpid()


def fetch(path: str, dest: str, timeout: float = 600.0) -> Dict[str, Any]:
    """Pull ``path`` from the controller's FileService into ``dest``;
    return the size and the seconds spent in ``get_file`` on this side.
    ``dest`` is removed afterwards so repeated runs do not fill the disk."""
    service = importlib.import_module("ansible_mitogen_svc.service")
    files = importlib.import_module("ansible_mitogen_svc.files")
    parent = service.current_call().parent
    started = time.perf_counter()
    meta = files.get_file(parent, path, dest, timeout=timeout)
    elapsed = time.perf_counter() - started
    size = os.path.getsize(dest)
    os.unlink(dest)
    return {"size": size, "meta_size": meta.get("size") if isinstance(meta, dict) else None,
            "seconds": elapsed}
