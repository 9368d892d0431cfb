#!/usr/bin/python
# Test module: respawns under the interpreter given in ``target`` (as apt,
# dnf or selinux modules do when their library lives only in the system
# Python), then reports where it ran.
from __future__ import annotations

import sys

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.respawn import (has_respawned, probe_interpreters_for_module,
                                                 respawn_module)


def main():
    module = AnsibleModule(argument_spec=dict(target=dict(type="str", required=True),
                                              fail=dict(type="bool", default=False)))
    if not has_respawned():
        found = probe_interpreters_for_module([module.params["target"]], "json")
        if found is None:
            module.fail_json(msg="no usable interpreter at %s" % module.params["target"])
        respawn_module(found)
    result = dict(changed=False, executable=sys.executable, respawned=has_respawned())
    if module.params["fail"]:
        module.fail_json(msg="failed after the respawn", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
