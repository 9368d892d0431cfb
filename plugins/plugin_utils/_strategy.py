# PRIVATE to the collection: not a public API, may change without notice.
"""What every mitogen.svc strategy does around the builtin strategy's run().

Runs on: the controller (ansible-playbook main process).

:func:`activated` starts the mux (once per process) and, for the duration of
the strategy's ``run()``, makes ``connection_loader.get_with_context`` hand
out this collection's connection plugins for ``ssh``, ``smart`` and
``local``, and ``action_loader.get_with_context`` mix
:class:`_action.ActionMixin` into actions running over those connections.
Workers fork inside ``run()`` and inherit the switch; plays run by other
strategies see the stock plugins.

:class:`WakeOnResult` replaces the builtin strategies' 1 ms polling while
they wait for results with a wait that a result (or a worker's inventory
RPC) ends at once.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import queue
import threading
import typing as t

from ansible.errors import AnsibleError
from ansible.plugins.loader import action_loader, connection_loader, shell_loader
from ansible.utils.display import Display

from ansible_collections.mitogen.svc.plugins.plugin_utils import _mux, _payload

#: Stock connection names and the plugin replacing each under the strategy.
REPLACEMENTS = {
    "ssh": "mitogen.svc.mitogen_ssh",
    "ansible.builtin.ssh": "mitogen.svc.mitogen_ssh",
    "smart": "mitogen.svc.mitogen_ssh",
    "ansible.builtin.smart": "mitogen.svc.mitogen_ssh",
    "local": "mitogen.svc.mitogen_local",
    "ansible.builtin.local": "mitogen.svc.mitogen_local",
}

_switch = {"active": 0, "bypass": 0}
display = Display()
#: Seconds between checks for dead workers and termination while waiting
#: for results (a result ends the wait at once).
RESULT_WAIT = 0.05


def stock_connection(name: str, *args: t.Any, **kwargs: t.Any) -> t.Any:
    """The stock connection plugin ``name``, even while our replacements
    are active (fallback of a connection whose target has no Python)."""
    _switch["bypass"] += 1
    try:
        return connection_loader.get(name, *args, **kwargs)
    finally:
        _switch["bypass"] -= 1


def _install_hook() -> None:
    current = connection_loader.get_with_context
    if getattr(current, "_mitogen_svc_hook", False):
        return

    @functools.wraps(current)
    def get_with_context(name: str, *args: t.Any, **kwargs: t.Any) -> t.Any:
        if _switch["active"] and not _switch["bypass"] and isinstance(name, str):
            name = REPLACEMENTS.get(name, name)
        return current(name, *args, **kwargs)

    get_with_context._mitogen_svc_hook = True  # type: ignore[attr-defined]
    # An instance attribute on the one shared loader: PluginLoader.get()
    # and the TaskExecutor both look it up through the instance.
    connection_loader.get_with_context = get_with_context  # type: ignore[method-assign]
    _install_action_hook()


def _install_action_hook() -> None:
    current = action_loader.get_with_context
    if getattr(current, "_mitogen_svc_hook", False):
        return
    from ansible_collections.mitogen.svc.plugins.plugin_utils import _action, _async

    @functools.wraps(current)
    def get_with_context(*args: t.Any, **kwargs: t.Any) -> t.Any:
        if _switch["active"] and args:  # async_status -> mitogen_async_status
            args = (_async.redirect(args[0], kwargs.get("connection")),) + args[1:]
        result = current(*args, **kwargs)
        if _switch["active"]:
            _action.mix_in(getattr(result, "object", None))
        return result

    get_with_context._mitogen_svc_hook = True  # type: ignore[attr-defined]
    action_loader.get_with_context = get_with_context  # type: ignore[method-assign]


def _preload_plugins(stock: bool = True) -> None:
    """Load our connection plugins once in this process, before workers
    fork: each worker would otherwise compile the plugin and parse its
    DOCUMENTATION (the option definitions) again, ~25 ms of CPU per task
    and host, as the plugin loader caches both per process.

    With ``stock``, the stock ssh plugin too (~65 ms): a connection compares
    its own answers with that plugin's while its agent starts (the first
    task of each host). For a single host that is one worker, where the
    load overlaps with the agent's start instead of delaying the worker."""
    names = sorted(set(REPLACEMENTS.values())) + (["ansible.builtin.ssh"] if stock else [])
    for name in names:
        connection_loader.get(name, class_only=True)
    # ansible-core 2.21: a per-process cache each worker fills again for
    # every task result (~7 ms of type-hint evaluation) unless filled here.
    # functools.cache keys a keyword argument apart from a positional one:
    # call it the way ansible-core does.
    try:
        from ansible._internal._task import UnifiedTaskResult  # type: ignore[import-not-found]
        for source_is_module in (False, True):
            UnifiedTaskResult.get_result_key_to_resolved_field_mapping(
                source_is_module=source_is_module)
    except Exception:  # another ansible-core: nothing to warm
        pass
    _preload_worker_imports()


#: Serialization profiles of module arguments and results (ansible-core
#: 2.19+) that nearly every worker imports.
_WORKER_IMPORTS = (
    "ansible.module_utils._internal._json._profiles._module_legacy_c2m",
    "ansible.module_utils._internal._json._profiles._module_legacy_m2c",
)


def _preload_worker_imports() -> None:
    """Import here what nearly every worker would import after its fork
    (found by listing each worker's new ``sys.modules`` on the benchmark
    playbook): the profiles above, the ``normal`` action (every module
    without an action plugin of its own) and the ``sh`` shell plugin's
    package. ~2 ms less CPU per task and host."""
    for name in _WORKER_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:  # ansible-core 2.18
            pass
    for loader, name in ((action_loader, "ansible.legacy.normal"), (shell_loader, "sh")):
        try:
            loader.get(name, class_only=True)
        except Exception:
            pass


def _host_count(strategy: t.Any, iterator: t.Any) -> int:
    """How many hosts the play (or serial batch) runs on; 2 when unknown."""
    try:
        return len(strategy.get_hosts_remaining(iterator._play))
    except Exception:
        return 2


@contextlib.contextmanager
def activated(strategy: t.Any = None, iterator: t.Any = None) -> t.Iterator[None]:
    """Start the mux, route stock connections to ours while the block runs
    (``strategy.run(iterator, ...)``)."""
    _mux.ensure_mux()  # starts while the rest of this is done
    _install_hook()
    _payload.zygote_key("")  # hash module_utils once, before workers fork
    _preload_plugins(stock=_host_count(strategy, iterator) > 1)
    _switch["active"] += 1
    try:
        yield
    finally:
        _switch["active"] -= 1


class _WakingDeque(collections.deque):  # type: ignore[type-arg]
    """The strategy's result list: every append sets ``wake``."""

    def __init__(self, items: t.Iterable[t.Any], wake: threading.Event) -> None:
        super().__init__(items)
        self.wake = wake

    def append(self, item: t.Any) -> None:
        super().append(item)
        self.wake.set()


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The strategy's queue of worker RPCs: every put sets ``wake``."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self.wake = wake

    def put(self, item: t.Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake.set()


class WakeOnResult:
    """Mixed into our strategies, before the builtin one.

    The builtin ``_wait_on_pending_results`` sleeps 1 ms
    (``internal_poll_interval``) between looks at the results the results
    thread collected: ~1000 wake-ups per second of the run, ~3% of the
    controller's CPU in a playbook that runs 4x faster than vanilla. Here
    the results thread's append (and a worker's inventory RPC, ansible-core
    2.19+) ends the wait at once; dead workers and termination are checked
    as before, every :data:`RESULT_WAIT` s at the latest. The loop is
    otherwise the builtin one (the same in ansible-core 2.18-2.21)."""

    _results: t.Any
    _results_lock: t.Any
    _pending_results: int
    _tqm: t.Any

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._msvc_wake = threading.Event()
        with self._results_lock:  # the results thread already runs
            self._results = _WakingDeque(self._results, self._msvc_wake)
        if hasattr(self, "_rpc_queue"):  # ansible-core 2.19+; no worker yet to use it
            self._rpc_queue = _WakingQueue(self._msvc_wake)

    def _wait_on_pending_results(self, iterator: t.Any) -> list[t.Any]:
        ret_results: list[t.Any] = []
        display.debug("waiting for pending results...")
        while self._pending_results > 0 and not self._tqm._terminated:
            if self._tqm.has_dead_workers():
                raise AnsibleError("A worker was found in a dead state")
            self._msvc_wake.clear()  # before looking: a later result sets it again
            results = self._process_pending_results(iterator)  # type: ignore[attr-defined]
            ret_results.extend(results)
            if self._pending_results > 0:
                self._msvc_wake.wait(RESULT_WAIT)
        display.debug("no more pending results, returning what we have")
        return ret_results
