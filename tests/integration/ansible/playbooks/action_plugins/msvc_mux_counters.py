# Test-only action of the mitogen.svc integration suite: the mux's traffic
# counters (ConnectionService.counters), read by the async tests.
from __future__ import annotations

from ansible.plugins.action import ActionBase

from ansible_collections.mitogen.svc.plugins.plugin_utils import _mux


class ActionModule(ActionBase):
    """Returns ``counters``: one dict per agent the mux runs (see
    ansible_mitogen_svc.mux.ConnectionService.counters). Fails without a mux."""

    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        if _mux.mux_path() is None:
            result.update(failed=True, msg="no mitogen.svc mux in this run")
            return result
        result["counters"] = _mux.client().connection_call("counters", 30.0)
        result["changed"] = False
        return result
