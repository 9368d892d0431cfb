#!/usr/bin/python
# Test-only, runs on targets: a new-style module that raises an exception
# instead of returning a result (scenario suite helper).
from __future__ import annotations

DOCUMENTATION = r"""
module: msvc_raise
short_description: Raise an uncaught exception (scenario suite helper)
options:
  text:
    description: The exception's message.
    type: str
    default: boom
"""

from ansible.module_utils.basic import AnsibleModule


class MsvcBoom(RuntimeError):
    pass


def main():
    module = AnsibleModule(argument_spec=dict(text=dict(type="str", default="boom")))
    raise MsvcBoom("msvc module exploded: %s" % module.params["text"])


if __name__ == "__main__":
    main()
