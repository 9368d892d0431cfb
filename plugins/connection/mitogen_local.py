# Copyright (c) mitogen.svc developers
# BSD-3-Clause (see LICENSE)
from __future__ import annotations

DOCUMENTATION = """
    name: mitogen_local
    short_description: Run on the controller through a persistent mitogen.svc agent
    description:
        - Like the builtin C(local) plugin, but commands run in one agent on the
          controller that lives for the whole ansible-playbook run.
        - The mitogen.svc strategies swap it in for C(local) automatically.
        - As with C(local), the remote user is ignored; everything runs as the
          user who started Ansible.
    version_added: 0.1.0
    author: mitogen.svc developers
    extends_documentation_fragment:
      - mitogen.svc.agent_connection
    options:
      pipelining:
        description: Send modules on stdin instead of copying them first, as for C(local).
        type: boolean
        default: false
        ini:
          - section: defaults
            key: pipelining
          - section: connection
            key: pipelining
        env:
          - name: ANSIBLE_PIPELINING
        vars:
          - name: ansible_pipelining
        version_added: 0.1.0
"""

import getpass
import os
import shutil
import typing as t

from ansible.errors import AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes

from ansible_collections.mitogen.svc.plugins.plugin_utils import _bytecode  # noqa: F401  (first: caches bytecode)
from ansible_collections.mitogen.svc.plugins.plugin_utils._connection import (AgentConnection,
                                                                              display)

# What the builtin local plugin runs commands with (DEFAULT_EXECUTABLE).
_SHELL = "/bin/sh"


class Connection(AgentConnection):
    """local through a persistent mitogen.svc agent."""

    transport = "mitogen.svc.mitogen_local"
    _transport_word = "local"

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self.default_user = getpass.getuser()
        except (KeyError, OSError):
            self.default_user = ""

    def _route_spec(self) -> dict[str, t.Any]:
        return {"kind": "local", "timeout": 30}

    def _connect(self) -> "Connection":
        self._play_context.remote_user = self.default_user
        if not self._connected:
            display.vvv("ESTABLISH MITOGEN_LOCAL CONNECTION FOR USER: %s" % self.default_user,
                        host=self._describe_host())
        super()._connect()
        return self

    def _shell_argv(self, cmd: str) -> list[str]:
        return [_SHELL, "-c", cmd]

    # Same machine, same user: copying in this process is what `local` does.
    def put_file(self, in_path: str, out_path: str) -> None:
        display.vvv("PUT %s TO %s" % (in_path, out_path), host=self._describe_host())
        b_in = to_bytes(in_path, errors="surrogate_or_strict")
        if not os.path.exists(b_in):
            raise AnsibleFileNotFound("file or module does not exist: %s" % in_path)
        try:
            shutil.copyfile(b_in, to_bytes(out_path, errors="surrogate_or_strict"))
        except shutil.Error as exc:
            raise AnsibleError("failed to copy: %s and %s are the same"
                               % (in_path, out_path)) from exc
        except OSError as exc:
            raise AnsibleError("Failed to transfer file to %r." % out_path) from exc

    def fetch_file(self, in_path: str, out_path: str) -> None:
        display.vvv("FETCH %s TO %s" % (in_path, out_path), host=self._describe_host())
        self.put_file(in_path, out_path)
