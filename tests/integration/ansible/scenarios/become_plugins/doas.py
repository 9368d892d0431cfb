# Test-only, controller side: a small doas become plugin for the scenario
# suite, because ansible-core ships none (community.general has one, and
# the test venv installs ansible-core only). Loaded from the become_plugins/
# directory next to the scenario playbooks, so `become_method: doas` finds it.
from __future__ import annotations

DOCUMENTATION = """
    name: doas
    short_description: Run as another user with OpenBSD doas (scenario suite helper)
    description:
        - Wraps the command in C(doas -u USER SHELL -c ...). With a password,
          answers the C(doas (user@host) password:) prompt on the tty.
    options:
        become_user:
            description: The user to run as.
            default: root
            vars:
              - name: ansible_become_user
            keyword:
              - name: become_user
        become_exe:
            description: The doas executable.
            default: doas
            vars:
              - name: ansible_become_exe
            keyword:
              - name: become_exe
        become_flags:
            description: Extra doas flags.
            default: ''
            vars:
              - name: ansible_become_flags
            keyword:
              - name: become_flags
        become_pass:
            description: The login user's password, asked by doas.
            required: false
            vars:
              - name: ansible_become_password
              - name: ansible_become_pass
"""

import re

from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.become import BecomeBase

_PROMPT = re.compile(r"doas \([^)]*\) password:")


class BecomeModule(BecomeBase):

    name = "doas"

    # opendoas reads the password from the controlling tty only, so the
    # command must not be pipelined (the ssh plugin then allocates a tty).
    pipelining = False

    fail = ("doas: Authentication failed",)
    missing = ("doas: Authentication required", "doas: Authorization required")

    def check_password_prompt(self, b_output: bytes) -> bool:
        return bool(_PROMPT.search(to_text(b_output, errors="replace")))

    def build_become_command(self, cmd, shell):
        super().build_become_command(cmd, shell)
        if not cmd:
            return cmd
        # Any non-empty value makes connections wait for a prompt when a
        # password is set; stripping uses it as the prompt's first bytes.
        self.prompt = "doas ("
        words = [self.get_option("become_exe") or "doas"]
        flags = (self.get_option("become_flags") or "").split()
        if not self.get_option("become_pass") and "-n" not in flags:
            flags.append("-n")  # never hang on a prompt nobody answers
        words += flags
        words += ["-u", self.get_option("become_user") or "root"]
        shell_exe = getattr(shell, "executable", None) or "/bin/sh"
        words += [shell_exe, "-c", self._build_success_command(cmd, shell, noexe=True)]
        return " ".join(words)
