"""Per-host TCP proxies for bench/ansible.py: delay, bytes and round trips.

Benchmark only, controller side. Every testbed host gets one
tests/lib/latency_proxy.py ``LatencyProxy`` in front of its sshd; Ansible's
inventory points at the proxies, so every ssh connection of a run (vanilla
ControlPersist masters, sftp transfers, mitogen.svc agents) goes through
them. The proxies live in a child process (this file run as a script) so
their event loops never compete with the benchmark for a GIL, and the one
delay they add can be changed between runs (``delay S`` on stdin).

Besides the byte counters LatencyProxy already keeps, ``CountingProxy``
counts **bursts**: per TCP connection, the chunks the proxy reads are a
sequence of controller->target ("up") and target->controller ("down")
reads; a burst is a maximal run of reads in one direction. An up burst that
follows a down burst is a new request the controller sent after hearing
from the target, so ``up_bursts`` is the number of times a connection
turned around, i.e. the round trips it needed (its first up burst, the ssh
banner, included). The TCP handshake is not seen by the proxy and not
counted.

Protocol on stdin (one line each, one JSON line answered on stdout):
``delay SECONDS`` -> ``{"ok": true}``; ``stats`` -> a list with one dict
per proxy; ``quit`` -> stops every proxy and exits.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS_LIB = os.path.join(os.path.dirname(HERE), "tests", "lib")


def _counting_proxy_class() -> Any:
    """CountingProxy, defined once tests/lib is importable (child only)."""
    if TESTS_LIB not in sys.path:
        sys.path.insert(0, TESTS_LIB)
    from latency_proxy import LatencyProxy  # type: ignore[import-not-found]

    class _Conn:
        __slots__ = ("last",)

        def __init__(self) -> None:
            self.last: Optional[bool] = None  # True: last read went up

    class _CountingReader:
        """Wraps one direction's StreamReader; records each chunk read."""

        def __init__(self, src: Any, conn: _Conn, up: bool, owner: Any) -> None:
            self._src = src
            self._conn = conn
            self._up = up
            self._owner = owner

        async def read(self, n: int = -1) -> bytes:
            data = await self._src.read(n)
            if data:
                self._owner.note(self._conn, self._up)
            return bytes(data)

    class CountingProxy(LatencyProxy):  # type: ignore[misc, valid-type]
        """A LatencyProxy that also counts bursts per direction.

        ``LatencyProxy._handle`` creates the two pump coroutines of one
        connection one after the other inside the connection's task; this
        override runs at that moment (it is a plain method returning the
        parent's coroutine), so both directions of a connection share one
        ``_Conn`` keyed by that task.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.up_bursts = 0
            self.down_bursts = 0
            self._pairing: Dict[Any, _Conn] = {}

        def note(self, conn: _Conn, up: bool) -> None:
            if conn.last is not up:
                if up:
                    self.up_bursts += 1
                else:
                    self.down_bursts += 1
                conn.last = up

        def _pump(self, src: Any, dst: Any, upstream: bool) -> Any:  # type: ignore[override]
            task = asyncio.current_task()
            conn = self._pairing.pop(task, None)
            if conn is None:
                conn = self._pairing[task] = _Conn()
            return LatencyProxy._pump(self, _CountingReader(src, conn, upstream, self),
                                      dst, upstream)

        def counters(self) -> Dict[str, int]:
            out = dataclasses.asdict(self.stats)
            out["up_bursts"] = self.up_bursts
            out["down_bursts"] = self.down_bursts
            return out

    return CountingProxy


def proxy_main(spec_json: str) -> int:
    """The child: start one proxy per target, print their addresses, then
    serve the stdin protocol."""
    spec = json.loads(spec_json)
    cls = _counting_proxy_class()
    delay = float(spec.get("delay", 0.0))
    proxies = []
    try:
        for host, port in spec["targets"]:
            proxies.append(cls(target=(host, int(port)), delay=delay).start())
        print(json.dumps({"addresses": [list(p.address) for p in proxies]}), flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "delay":
                for p in proxies:
                    p.delay = float(words[1])
                print(json.dumps({"ok": True}), flush=True)
            elif words[0] == "stats":
                print(json.dumps([p.counters() for p in proxies]), flush=True)
            elif words[0] == "quit":
                break
    finally:
        for p in proxies:
            p.stop()
    return 0


class Proxies:
    """Controller side handle on the proxy child process."""

    def __init__(self, targets: List[Tuple[str, int]], delay: float = 0.0) -> None:
        spec = json.dumps({"targets": [list(t) for t in targets], "delay": delay})
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), spec],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.stop()
            raise RuntimeError("latency proxy process did not start")
        self.addresses = [(a[0], int(a[1])) for a in json.loads(line)["addresses"]]
        self.delay = delay

    def _ask(self, command: str) -> Any:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("latency proxy process died")
        return json.loads(line)

    def set_delay(self, one_way_s: float) -> None:
        self._ask("delay %r" % one_way_s)
        self.delay = one_way_s

    def stats(self) -> List[Dict[str, int]]:
        return self._ask("stats")

    def totals(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for one in self.stats():
            for k, v in one.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def wait_idle(self, timeout: float = 15.0) -> bool:
        """Wait until no connection is open through any proxy."""
        deadline = time.monotonic() + timeout
        while True:
            if self.totals().get("connections_active", 0) == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            assert self.proc.stdin
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(5)


if __name__ == "__main__":
    sys.exit(proxy_main(sys.argv[1]))
