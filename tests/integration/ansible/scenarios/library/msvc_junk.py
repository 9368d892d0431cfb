#!/usr/bin/python
# Test-only, runs on targets: a new-style module that prints noise before
# and after its JSON result (scenario suite helper).
from __future__ import annotations

DOCUMENTATION = r"""
module: msvc_junk
short_description: Print junk around the JSON result (scenario suite helper)
options:
  where:
    description: before, after or both.
    type: str
    default: both
"""

import atexit
import sys

from ansible.module_utils.basic import AnsibleModule


def _trailer():
    sys.stdout.write("trailing junk line 1\ntrailing junk line 2\n")
    sys.stdout.flush()


def main():
    module = AnsibleModule(argument_spec=dict(where=dict(type="str", default="both")))
    where = module.params["where"]
    if where in ("before", "both"):
        sys.stdout.write("leading junk, not JSON\n")
        sys.stdout.flush()
    if where in ("after", "both"):
        atexit.register(_trailer)
    module.exit_json(changed=False, where=where)


if __name__ == "__main__":
    main()
