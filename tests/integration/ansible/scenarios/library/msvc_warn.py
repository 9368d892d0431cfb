#!/usr/bin/python
# Test-only, runs on targets: a new-style module that emits a warning and a
# deprecation (scenario suite helper).
from __future__ import annotations

DOCUMENTATION = r"""
module: msvc_warn
short_description: Emit a warning and a deprecation (scenario suite helper)
options:
  text:
    description: Text used in both messages.
    type: str
    default: careful
"""

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(argument_spec=dict(text=dict(type="str", default="careful")),
                           supports_check_mode=True)
    text = module.params["text"]
    module.warn("msvc warning: %s" % text)
    module.deprecate("msvc deprecation: %s" % text, version="99.0")
    module.exit_json(changed=False, text=text)


if __name__ == "__main__":
    main()
