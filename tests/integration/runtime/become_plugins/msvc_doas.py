"""A doas become plugin for the tests (test-only, controller side).

community.general is not installed here and ansible-core ships no doas
plugin, so this stands in for ``community.general.doas``: it builds the
same shape of command (``doas [-n] -u USER SHELL -c 'echo SUCCESS; CMD'``),
sets ``prompt`` to a non-string after building, and uses that plugin's
``fail``/``missing`` texts, so the tests see what a third-party plugin
gives the become helper.
"""
from __future__ import annotations

DOCUMENTATION = """
    name: msvc_doas
    short_description: doas, for the mitogen.svc tests
    description:
        - Runs the command as another user with doas.
    author: mitogen.svc tests
    options:
        become_user:
            description: User to become.
            vars:
              - name: ansible_become_user
        become_exe:
            description: The doas executable.
            default: doas
            vars:
              - name: ansible_become_exe
        become_flags:
            description: Options to pass to doas.
            default: ''
            vars:
              - name: ansible_become_flags
        become_pass:
            description: The password for the doas prompt.
            required: False
            vars:
              - name: ansible_become_password
"""

import typing as t

from ansible.plugins.become import BecomeBase


class BecomeModule(BecomeBase):

    name = "msvc_doas"

    fail = ("Permission denied",)
    missing = ("Authorization required",)

    def build_become_command(self, cmd: str, shell: t.Any) -> str:
        super().build_become_command(cmd, shell)
        if not cmd:
            return cmd
        self.prompt = True  # type: ignore[assignment]  # as community.general's plugin does
        flags = self.get_option("become_flags") or ""
        if not self.get_option("become_pass") and "-n" not in flags.split():
            flags = (flags + " -n").strip()
        user = self.get_option("become_user")
        parts = [self.get_option("become_exe") or "doas", flags]
        if user:
            parts += ["-u", user]
        parts += [shell.executable, "-c", self._build_success_command(cmd, shell, noexe=True)]
        return " ".join(p for p in parts if p)
