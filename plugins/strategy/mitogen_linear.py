# Copyright (c) mitogen.svc developers
# BSD-3-Clause (see LICENSE)
from __future__ import annotations

DOCUMENTATION = """
    name: mitogen_linear
    short_description: The builtin linear strategy, run through mitogen.svc agents
    description:
        - Behaves exactly like the builtin C(linear) strategy.
        - Starts the mitogen.svc mux once per ansible-playbook run and, while
          the play runs, replaces the C(ssh), C(smart) and C(local) connections
          with M(mitogen.svc.mitogen_ssh) and M(mitogen.svc.mitogen_local),
          which keep one persistent Python agent per host and login user.
        - Other connection types run exactly as they would under C(linear).
    version_added: 0.1.0
    author: mitogen.svc developers
"""

import typing as t

from ansible.plugins.strategy.linear import StrategyModule as _Builtin

from ansible_collections.mitogen.svc.plugins.plugin_utils import _bytecode  # noqa: F401  (first: caches bytecode)
from ansible_collections.mitogen.svc.plugins.plugin_utils._strategy import WakeOnResult, activated


class StrategyModule(WakeOnResult, _Builtin):
    """Thin activator: start the mux, switch connections, delegate."""

    def run(self, iterator: t.Any, play_context: t.Any) -> t.Any:
        with activated(self, iterator):
            return super().run(iterator, play_context)
