# Test-only, controller side: records every task result as JSON lines.
from __future__ import annotations

DOCUMENTATION = """
    name: msvc_capture
    type: aggregate
    short_description: Write each task result to the file named by MSVC_CAPTURE_FILE
    description:
        - Test helper of the mitogen.svc integration suite.
    requirements:
        - enabled in callbacks_enabled
"""

import json
import os

from ansible.module_utils.common.json import AnsibleJSONEncoder
from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "msvc_capture"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._path = os.environ.get("MSVC_CAPTURE_FILE")
        self._seq = 0

    def _record(self, status: str, result, **extra) -> None:
        if not self._path:
            return
        data = getattr(result, "_result", None)
        if data is None:
            data = getattr(result, "result", {})
        task = getattr(result, "task", None) or result._task
        host = getattr(result, "host", None) or result._host
        self._seq += 1
        entry = {"seq": self._seq, "status": status, "task": task.get_name(),
                 "action": task.action, "host": host.get_name(), "result": data}
        entry.update(extra)
        with open(self._path, "a") as fp:
            fp.write(json.dumps(entry, cls=AnsibleJSONEncoder, sort_keys=True) + "\n")

    def v2_runner_on_ok(self, result) -> None:
        self._record("ok", result)

    def v2_runner_on_failed(self, result, ignore_errors=False) -> None:
        self._record("failed", result, ignore_errors=ignore_errors)

    def v2_runner_on_skipped(self, result) -> None:
        self._record("skipped", result)

    def v2_runner_on_unreachable(self, result) -> None:
        self._record("unreachable", result)

    def v2_playbook_on_stats(self, stats) -> None:
        if not self._path:
            return
        hosts = sorted(stats.processed.keys())
        summary = {h: stats.summarize(h) for h in hosts}
        with open(self._path, "a") as fp:
            fp.write(json.dumps({"seq": "stats", "stats": summary}, sort_keys=True) + "\n")
