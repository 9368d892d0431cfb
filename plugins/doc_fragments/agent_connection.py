# Copyright (c) mitogen.svc developers
# BSD-3-Clause (see LICENSE)
"""Options shared by the connection plugins that run through an agent."""
from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
    options:
      become_cap:
        description:
          - Most become agents (one per become user, method and settings) kept
            below one login agent. Asking for one more stops the least recently
            used one (and anything chained below it).
        type: integer
        default: 8
        vars:
          - name: ansible_mitogen_become_cap
        env:
          - name: ANSIBLE_MITOGEN_BECOME_CAP
        version_added: 0.1.0
"""
