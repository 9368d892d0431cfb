# Copyright (c) mitogen.svc developers
# BSD-3-Clause (see galaxy.yml)
"""mitogen_async_status: async_status answered by the mux when it can.

Runs on: the controller (Ansible workers). Under the mitogen.svc strategies
``async_status`` (also the implicit one of ``poll: N``) loads this action;
the task keeps its action name. See docs/async.md.
"""
from __future__ import annotations

import typing as t

from ansible.plugins.action.async_status import ActionModule as StockAsyncStatus

from ansible_collections.mitogen.svc.plugins.plugin_utils import _bytecode  # noqa: F401  (first: caches bytecode)
from ansible_collections.mitogen.svc.plugins.plugin_utils import _async


class ActionModule(StockAsyncStatus):
    """The stock async_status action, except that a job's final result
    pushed to the mux's JobResultService is answered without a message to
    the target (see plugin_utils/_async.py)."""

    def run(self, tmp: t.Any = None, task_vars: t.Any = None) -> t.Any:
        return _async.run_status(self, super().run, tmp, task_vars)

    def _get_async_dir(self) -> str:
        return _async.status_async_dir(self, super()._get_async_dir)
