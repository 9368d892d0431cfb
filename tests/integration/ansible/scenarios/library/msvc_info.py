#!/usr/bin/python
# Test-only, runs on targets: a new-style (AnsiballZ) module of the
# mitogen.svc scenario suite. It reports who and where it runs, and can
# fail on request or echo a no_log secret.
from __future__ import annotations

DOCUMENTATION = r"""
module: msvc_info
short_description: Report the module's execution context (scenario suite helper)
options:
  env:
    description: Names of environment variables to report.
    type: list
    elements: str
    default: []
  secret:
    description: A value that must never show up in results.
    type: str
    no_log: true
  fail:
    description: Call fail_json instead of exit_json.
    type: bool
    default: false
  rc:
    description: The rc reported when failing.
    type: int
    default: 1
  data:
    description: Anything; returned unchanged.
    type: raw
  change:
    description: Report changed=true (or, in check mode, that it would change).
    type: bool
    default: false
"""

import os
import pwd
import sys

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(
        argument_spec=dict(
            env=dict(type="list", elements="str", default=[]),
            secret=dict(type="str", no_log=True),
            fail=dict(type="bool", default=False),
            rc=dict(type="int", default=1),
            data=dict(type="raw"),
            change=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    p = module.params
    result = dict(
        changed=p["change"],
        user=pwd.getpwuid(os.geteuid()).pw_name,
        python="%d.%d" % sys.version_info[:2],
        check_mode=module.check_mode,
        diff_mode=module._diff,
        env=dict((name, os.environ.get(name)) for name in p["env"]),
        data=p["data"],
    )
    if p["secret"] is not None:
        result["msg"] = "the secret is %s" % p["secret"]
    if p["fail"]:
        module.fail_json(msg="failing on request", rc=p["rc"], **dict(
            (k, v) for k, v in result.items() if k != "msg"))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
