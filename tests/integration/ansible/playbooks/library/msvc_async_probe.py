#!/usr/bin/python
# Test-only module of the mitogen.svc integration suite (async tests).
from __future__ import annotations

DOCUMENTATION = r"""
---
module: msvc_async_probe
short_description: Misbehaves on request, for the async tests
description: Test helper of the mitogen.svc integration suite.
options:
  behaviour:
    description: What to do.
    type: str
    default: ok
    choices: [ok, junk, blank, stderr, fail, raise, nojson]
  sleep:
    description: Seconds to sleep first.
    type: float
    default: 0
author: mitogen.svc developers
"""

import atexit
import sys
import time

from ansible.module_utils.basic import AnsibleModule


def main() -> None:
    module = AnsibleModule(argument_spec=dict(
        behaviour=dict(type="str", default="ok",
                       choices=["ok", "junk", "blank", "stderr", "fail", "raise", "nojson"]),
        sleep=dict(type="float", default=0.0)))  # no check mode support, on purpose
    behaviour = module.params["behaviour"]
    if module.params["sleep"]:
        time.sleep(module.params["sleep"])
    if behaviour == "junk":
        print("junk before the JSON")
        atexit.register(print, "junk after the JSON")
    elif behaviour == "blank":
        atexit.register(print, "")
    elif behaviour == "stderr":
        sys.stderr.write("raw stderr of the probe\n")
    elif behaviour == "fail":
        module.fail_json(msg="the probe failed on purpose", rc=3)
    elif behaviour == "raise":
        raise RuntimeError("the probe raised on purpose")
    elif behaviour == "nojson":
        print("no JSON at all")
        sys.exit(0)
    module.exit_json(changed=False, behaviour=behaviour)


if __name__ == "__main__":
    main()
