"""Our strategies wait for results without the builtin 1 ms polling, and
still see every result, every worker RPC and a dead worker."""
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

# A stand-in for the builtin StrategyBase: the attributes and the one method
# _wait_on_pending_results uses, with the results thread's locking.
PRELUDE = """
import collections, queue, threading, time
from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder
_AnsibleCollectionFinder(paths=[%(path)r])._install()
from ansible.errors import AnsibleError
from ansible.plugins.strategy import StrategyBase
from ansible_collections.mitogen.svc.plugins.plugin_utils import _strategy

class TQM:
    _terminated = False
    dead = False
    def has_dead_workers(self):
        return self.dead

class Base:
    _wait_on_pending_results = StrategyBase._wait_on_pending_results

    def __init__(self):
        self._results = collections.deque(["early"])
        self._results_lock = threading.Condition(threading.Lock())
        self._rpc_queue = queue.Queue()
        self._pending_results = 0
        self._tqm = TQM()
        self.passes = 0
        self.on_rpc = lambda item: None
    def _process_pending_results(self, iterator):
        self.passes += 1
        while True:
            try:
                self.on_rpc(self._rpc_queue.get(block=False))
            except queue.Empty:
                break
        out = []
        while True:
            with self._results_lock:
                if not self._results:
                    break
                out.append(self._results.popleft())
            self._pending_results -= 1
        return out

class Ours(_strategy.WakeOnResult, Base):
    pass

def deliver(strategy, delays):
    def run():
        for delay in delays:
            time.sleep(delay)
            with strategy._results_lock:  # as results_thread_main does
                strategy._results.append("r%%s" %% delay)
    threading.Thread(target=run, daemon=True).start()
"""


def _run(tmp_path: Path, body: str) -> str:
    svc = tmp_path / "ansible_collections" / "mitogen"
    svc.mkdir(parents=True)
    (svc / "svc").symlink_to(ROOT)
    script = PRELUDE % {"path": str(tmp_path)} + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_results_end_the_wait_without_polling(tmp_path: Path) -> None:
    out = _run(tmp_path, """
        ours = Ours()
        ours._pending_results = 3  # "early" is already there
        deliver(ours, [0.3, 0.3])
        got = ours._wait_on_pending_results(None)
        builtin = Base()
        builtin._pending_results = 3
        deliver(builtin, [0.3, 0.3])
        builtin._wait_on_pending_results(None)
        print(got, ours._pending_results, ours.passes, builtin.passes)
    """)
    got, pending, ours, builtin = out.rsplit(" ", 3)
    assert got == "['early', 'r0.3', 'r0.3']" and pending == "0"
    # The builtin loop looks ~1000 times a second; ours once per result and
    # every RESULT_WAIT (0.05 s) at most.
    assert int(builtin) > 150, out
    assert int(ours) <= 0.6 / 0.05 + 4, out


def test_a_worker_rpc_ends_the_wait(tmp_path: Path) -> None:
    out = _run(tmp_path, """
        _strategy.RESULT_WAIT = 60.0  # only a wake-up can end the wait early
        ours = Ours()
        ours._results.clear()
        ours._pending_results = 1
        seen = threading.Event()
        def on_rpc(item):  # the RPC is served, so the worker finishes its task
            seen.set()
            ours._results.append("after " + item)
        ours.on_rpc = on_rpc
        def put():
            time.sleep(0.2)
            ours._rpc_queue.put("rpc")
        threading.Thread(target=put, daemon=True).start()
        started = time.monotonic()
        got = ours._wait_on_pending_results(None)
        print(got, seen.is_set(), time.monotonic() - started < 30)
    """)
    assert out == "['after rpc'] True True"


def test_a_dead_worker_fails_the_wait(tmp_path: Path) -> None:
    out = _run(tmp_path, """
        ours = Ours()
        ours._results.clear()
        ours._pending_results = 1
        def die():
            time.sleep(0.2)
            ours._tqm.dead = True
        threading.Thread(target=die, daemon=True).start()
        try:
            ours._wait_on_pending_results(None)
        except AnsibleError as exc:
            print("raised", exc)
    """)
    assert out == "raised A worker was found in a dead state"
