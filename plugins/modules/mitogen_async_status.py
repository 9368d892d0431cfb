#!/usr/bin/python
# Copyright (c) mitogen.svc developers
# BSD-3-Clause (see galaxy.yml)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: mitogen_async_status
short_description: Status of an asynchronous task, answered by the mitogen.svc mux when it can
version_added: 0.1.0
description:
  - Takes the same arguments and returns the same result as M(ansible.builtin.async_status).
  - When the job ran in this playbook run through a mitogen.svc agent and has finished, its
    result was pushed to the mux and is returned without contacting the target, provided the
    task reaches the same agent (same host, user and interpreter) and uses the same async
    directory setting. Otherwise the stock async_status module reads the job file on the target
    (jobs from an earlier run, jobs started by vanilla Ansible, jobs still running).
  - Under the mitogen.svc strategies, C(async_status) tasks (and the polling of C(poll) > 0)
    use this action automatically and keep their action name.
  - O(mode=cleanup) removes the job file on the target and forgets the pushed result.
options:
  jid:
    description: Job or task identifier.
    type: str
    required: true
  mode:
    description:
      - V(status) obtains the status; V(cleanup) removes the job file
        (by default in C(~/.ansible_async/)).
    type: str
    choices: [cleanup, status]
    default: status
notes:
  - This module is implemented by its action plugin; it never runs on the target itself.
seealso:
  - module: ansible.builtin.async_status
author:
  - mitogen.svc developers
"""

EXAMPLES = r"""
- name: Start a long job
  ansible.builtin.command: /usr/local/bin/rebuild-index
  async: 3600
  poll: 0
  register: job

- name: Wait for it
  mitogen.svc.mitogen_async_status:
    jid: "{{ job.ansible_job_id }}"
  register: status
  until: status is finished
  retries: 360
  delay: 10
"""

RETURN = r"""
ansible_job_id:
  description: The asynchronous job id.
  returned: success
  type: str
  sample: 'j360874038559.4169'
finished:
  description: Whether the asynchronous job has finished.
  returned: always
  type: bool
started:
  description: Whether the asynchronous job has started.
  returned: always
  type: bool
results_file:
  description: Path of the job file on the target.
  returned: when O(mode=status)
  type: str
erased:
  description: Path of the removed job file.
  returned: when O(mode=cleanup)
  type: str
"""

from ansible.module_utils.basic import AnsibleModule


def main() -> None:
    module = AnsibleModule(argument_spec=dict(jid=dict(type="str", required=True),
                                              mode=dict(type="str", default="status",
                                                        choices=["cleanup", "status"])),
                           supports_check_mode=True)
    module.fail_json(msg="mitogen.svc.mitogen_async_status runs through its action plugin; "
                         "it cannot run as a module on the target")


if __name__ == "__main__":
    main()
