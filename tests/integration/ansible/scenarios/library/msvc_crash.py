#!/usr/bin/python
# Test-only, runs on targets: a new-style module that dies without a
# proper result, in the ways a real module can (scenario suite helper).
from __future__ import annotations

DOCUMENTATION = r"""
module: msvc_crash
short_description: Die without a JSON result (scenario suite helper)
options:
  how:
    description: >-
      exit (a printed partial line, then os._exit(3)), text (plain text,
      exit 0), kill (SIGKILL to itself), stderr (a line on stderr after the
      JSON, exit 0), leave (starts C(sleep 60) in a new session, holding
      the module's stdout, writes its pid to O(pidfile) and returns), or
      else whether stdin and stdout are terminals, as the result.
    type: str
    required: true
  pidfile:
    description: Where C(leave) writes the pid.
    type: str
"""

import json
import os
import signal
import subprocess
import sys

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(argument_spec=dict(how=dict(type="str", required=True),
                                              pidfile=dict(type="str")))
    how = module.params["how"]
    if how == "exit":
        print('{"partial": ')
        os._exit(3)
    if how == "text":
        print("no JSON here")
        sys.exit(0)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "stderr":
        print(json.dumps({"changed": False, "how": how}))
        sys.stdout.flush()
        sys.stderr.write("a line on stderr\n")
        sys.exit(0)
    if how == "leave":
        pid = subprocess.Popen(["sleep", "60"], start_new_session=True).pid
        with open(module.params["pidfile"], "w") as fp:
            fp.write("%d\n" % pid)
        module.exit_json(changed=True)
    module.exit_json(changed=False, stdin_tty=os.isatty(0), stdout_tty=os.isatty(1))


if __name__ == "__main__":
    main()
