"""Shipped to agents by test_files.py (extra_modules): receiver-side helpers
that pull files from the controller's FileService."""
from __future__ import annotations

import hashlib
import time
from typing import Any, Dict, Optional

from ansible_mitogen_svc import current_call
from ansible_mitogen_svc import files


class _HashSink:
    """A write()-able object that hashes and counts what it is given,
    optionally sleeping per write to play a slow disk."""

    def __init__(self, delay: float = 0.0, fail_after: Optional[int] = None) -> None:
        self.hash = hashlib.sha256()
        self.size = 0
        self.delay = delay
        self.fail_after = fail_after

    def write(self, data: Any) -> int:
        if self.fail_after is not None and self.size + len(data) > self.fail_after:
            raise OSError(28, "No space left on device (simulated)")
        self.hash.update(data)
        self.size += len(data)
        if self.delay:
            time.sleep(self.delay)
        return len(data)


def fetch_sha256(path: str, out_path: Optional[str] = None, timeout: float = 60.0,
                 delay: float = 0.0, source: str = "parent",
                 fail_after: Optional[int] = None) -> Dict[str, Any]:
    """Pull ``path`` from the FileService of ``source`` ("parent" or
    "controller"); return the sha256 of what was written (to ``out_path``
    when given, else to an in-memory hashing sink), its size, the metadata
    get_file returned and the seconds it took."""
    parent = getattr(current_call(), source)
    started = time.monotonic()
    if out_path is None:
        sink = _HashSink(delay, fail_after)
        meta = files.get_file(parent, path, sink, timeout=timeout)
        digest, size = sink.hash.hexdigest(), sink.size
    else:
        meta = files.get_file(parent, path, out_path, timeout=timeout)
        h = hashlib.sha256()
        size = 0
        with open(out_path, "rb") as fp:
            for block in iter(lambda: fp.read(1 << 20), b""):
                h.update(block)
                size += len(block)
        digest = h.hexdigest()
    return {"sha256": digest, "size": size, "meta": meta,
            "seconds": time.monotonic() - started}


class _NullSink:
    def write(self, data: Any) -> int:
        return len(data)


def fetch_null(path: str, timeout: float = 60.0) -> float:
    """Pull ``path`` into nothing; return the seconds it took."""
    started = time.monotonic()
    files.get_file(current_call().parent, path, _NullSink(), timeout=timeout)
    return time.monotonic() - started


def stall(path: str, timeout: float) -> Dict[str, Any]:
    """Ask the parent's FileService for ``path`` but never acknowledge:
    return what ends the stream (the sender's error marker) and how many
    chunks came before it."""
    from ansible_mitogen_svc.context import Receiver
    from ansible_mitogen_svc.wire import FLAG_RAW
    parent = current_call().parent
    recv = Receiver(parent.router, respondent=parent.context_id)
    try:
        meta = parent.call_service_async(files.SERVICE_NAME, "fetch", path=path,
                                         handle=recv.handle, timeout=timeout).get(10.0)
        chunks = 0
        while True:
            msg = recv.wait(timeout + 10.0)
            if not msg.flags & FLAG_RAW:
                return {"chunks": chunks, "window": meta["window"], "last": msg.data()}
            chunks += 1
    finally:
        recv.close()
