"""Where bench/runtime.py runs agents, and the latency proxy it runs them through.

Benchmark only, controller side. ``Target`` describes local pipes, ssh or
ssh through a proxy; ``ProxyProcess`` keeps tests/lib/latency_proxy.py
proxies in a child process (runtime.py --proxy-server, served by
``proxy_server_main``); ``tcp_bytes`` counts what an ssh session sends
through such a proxy. Stdlib-only at module level.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from _measure import REPO_ROOT, RUNTIME_SCRIPT, TESTS_LIB


class ProxyProcess:
    """LatencyProxy instances in a child process (runtime.py, --proxy-server
    mode), so the proxies' event loop never competes for our GIL."""

    def __init__(self, target: List[Any], delays: List[float]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, RUNTIME_SCRIPT, "--proxy-server",
             json.dumps({"target": target, "delays": delays})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.stop()
            raise RuntimeError("proxy process did not start")
        self.addresses = [tuple(a) for a in json.loads(line)["addresses"]]

    def stats(self) -> List[Dict[str, int]]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s["connections_active"] == 0 for s in self.stats()):
                return
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


def proxy_server_main(spec_json: str) -> int:
    """The --proxy-server child: start the proxies, print their addresses,
    then answer "stats" and "quit" lines on stdin."""
    import dataclasses
    sys.path.insert(0, TESTS_LIB)
    from latency_proxy import LatencyProxy  # type: ignore[import-not-found]
    spec = json.loads(spec_json)
    target = (spec["target"][0], int(spec["target"][1]))
    proxies = [LatencyProxy(target=target, delay=float(d)).start() for d in spec["delays"]]
    try:
        print(json.dumps({"addresses": [list(p.address) for p in proxies]}), flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "stats":
                print(json.dumps([dataclasses.asdict(p.stats) for p in proxies]), flush=True)
            elif cmd == "quit":
                break
    finally:
        for p in proxies:
            p.stop()
    return 0


class Target:
    """Where agents run: local pipes, ssh, or ssh through a proxy."""

    def __init__(self, key: str, label: str, host: Any = None,
                 via: Optional[tuple] = None) -> None:
        self.key = key
        self.label = label
        self.host = host
        self.via = via

    @property
    def is_ssh(self) -> bool:
        return self.host is not None

    def ssh_spec(self, via: Optional[tuple] = None) -> Dict[str, Any]:
        """Arguments for connect.ssh / mitogen's router.ssh."""
        h = self.host
        via = via or self.via
        args = list(h.ssh_options())
        if via is None:
            return {"hostname": h.address, "port": h.port, "username": "root",
                    "identity_file": str(h.key_path), "ssh_args": args}
        args += ["-o", "HostKeyAlias=[%s]:%d" % (h.address, h.port)]
        return {"hostname": via[0], "port": via[1], "username": "root",
                "identity_file": str(h.key_path), "ssh_args": args}

    def ssh_true_argv(self, via: Optional[tuple] = None) -> List[str]:
        via = via or self.via
        return self.host.ssh_argv("root", via=via) + ["true"]


def tcp_bytes(proxies: ProxyProcess, target: Target, run: Callable[[], Any]) -> Dict[str, int]:
    """TCP payload bytes through the counting proxy for ``run()`` (connect,
    one call, disconnect), minus those of `ssh true` through it."""
    def measure(fn: Callable[[], Any]) -> tuple:
        proxies.wait_idle()
        before = proxies.stats()[0]
        fn()
        proxies.wait_idle()
        after = proxies.stats()[0]
        return (after["bytes_upstream"] - before["bytes_upstream"],
                after["bytes_downstream"] - before["bytes_downstream"])
    base = measure(lambda: subprocess.run(target.ssh_true_argv(via=proxies.addresses[0]),
                                          stdin=subprocess.DEVNULL, check=True, timeout=60))
    total = measure(run)
    return {"up": total[0] - base[0], "down": total[1] - base[1],
            "total_up": total[0], "ssh_true_up": base[0]}
