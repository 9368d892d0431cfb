# PRIVATE to the collection: not a public API, may change without notice.
"""Load this collection's Python packages with a bytecode cache.

Runs on: the controller (ansible-playbook and its workers).

ansible-core's plugin loader reads a plugin file with the standard
``SourceFileLoader`` (bytecode cached), but what a plugin imports from its
collection goes through the collection loader, which compiles it from
source on every import and keeps no ``__pycache__``. The strategies,
connections and actions of this collection import ``plugin_utils`` and the
runtime (``ansible_mitogen_svc``, ~7000 lines): ~0.1 s of CPU at the start
of every ansible-playbook run, before its first worker forks, so on the way
to every first task.

Importing this module puts a finder first on ``sys.meta_path`` that loads
those two packages (and only them) with the standard library's
``SourceFileLoader``: the same files, module names and ``__file__``, with
bytecode read from and written to ``__pycache__`` like any installed
package (not written under ``PYTHONDONTWRITEBYTECODE``, nor where the
collection is read-only; stale caches are recompiled, as Python does).
Every entry point of the collection imports it first.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import typing as t

#: The packages whose modules this finder loads. The runtime package itself
#: too; ``plugin_utils`` has no ``__init__.py`` and stays ansible-core's.
RUNTIME = "ansible_collections.mitogen.svc.ansible_mitogen_svc"
_PREFIXES = (RUNTIME + ".", "ansible_collections.mitogen.svc.plugins.plugin_utils.")


class CachedSourceFinder:
    """Finds this collection's own packages' modules in their parent's
    ``__path__``; leaves any other name (and anything it cannot find) to
    the next finder."""

    def find_spec(self, fullname: str, path: t.Optional[t.Sequence[str]] = None,
                  target: t.Any = None) -> t.Optional[importlib.machinery.ModuleSpec]:
        if not path or not (fullname == RUNTIME or fullname.startswith(_PREFIXES)):
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            package = os.path.join(entry, leaf)
            init = os.path.join(package, "__init__.py")
            is_package = os.path.isfile(init)
            source = init if is_package else package + ".py"
            if is_package or os.path.isfile(source):
                return importlib.util.spec_from_file_location(
                    fullname, source, loader=importlib.machinery.SourceFileLoader(fullname, source),
                    submodule_search_locations=[package] if is_package else None)
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once per process)."""
    if not any(isinstance(f, CachedSourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CachedSourceFinder())


install()
