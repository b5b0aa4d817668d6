#!/usr/bin/python
"""Ansible module quiesce.quiesce.status: quiesce's status, last cycle and doctor verdict."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: status
short_description: Report quiesce's status, its last cycle and the doctor's verdict
description:
  - Runs C(quiesce status --json) and, when O(doctor_host) is set, C(quiesce doctor HOST --json)
    on the managed host, and returns them as facts. Changes nothing.
options:
  quiesce:
    description: The quiesce command (the role installs it in its virtual environment).
    type: path
    default: /opt/quiesce/bin/quiesce
  config:
    description: The config file.
    type: path
    default: /etc/quiesce/quiesce.toml
  doctor_host:
    description: Also ask C(quiesce doctor) about this snapshot host.
    type: str
  root:
    description: The staging root the host's files were installed under.
    type: path
    default: /
author: quiesce contributors
"""

EXAMPLES = r"""
- name: Read quiesce's state
  quiesce.quiesce.status:
    doctor_host: azure
- ansible.builtin.debug:
    var: quiesce_last_cycle
"""

RETURN = r"""
ansible_facts:
  description: Facts set on the host.
  returned: always
  type: dict
  contains:
    quiesce_status:
      description: The output of C(quiesce status --json).
      type: dict
    quiesce_last_cycle:
      description: >-
        The last finished cycle (finished_at, success, released_by, freeze_seconds,
        thaw_seconds, and per target name, kind, status, consistent, hold_seconds, error),
        or null when none is recorded or one is running.
      type: dict
    quiesce_doctor:
      description: The output of C(quiesce doctor HOST --json), or null.
      type: dict
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule


def _run_json(module, argv):
    rc, out, err = module.run_command(argv)
    try:
        return json.loads(out)
    except ValueError:
        module.fail_json(msg=f"{' '.join(argv[3:5])} failed: {err.strip() or out.strip()}", rc=rc)


def main():
    module = AnsibleModule(argument_spec={
        "quiesce": {"type": "path", "default": "/opt/quiesce/bin/quiesce"},
        "config": {"type": "path", "default": "/etc/quiesce/quiesce.toml"},
        "doctor_host": {"type": "str"},
        "root": {"type": "path", "default": "/"},
    }, supports_check_mode=True)
    quiesce, config = module.params["quiesce"], module.params["config"]
    if not os.access(quiesce, os.X_OK):
        module.fail_json(msg=f"quiesce is not installed at {quiesce}")
    base = [quiesce, "--config", config]
    status = _run_json(module, base + ["status", "--json"])
    doctor = None
    if module.params["doctor_host"]:
        doctor = _run_json(module, base + ["doctor", module.params["doctor_host"], "--root",
                                           module.params["root"], "--json"])
    module.exit_json(changed=False, ansible_facts={
        "quiesce_status": status, "quiesce_last_cycle": status.get("last_cycle"),
        "quiesce_doctor": doctor})


if __name__ == "__main__":
    main()
