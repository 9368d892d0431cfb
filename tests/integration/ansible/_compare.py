"""Normalise captured task results so vanilla and mitogen runs compare equal.

Test-only, controller side. Only fields that legitimately differ between
two runs are removed: timings, temp paths and per-connection facts.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List

#: Result keys whose values change on every run.
TIMING_KEYS = frozenset({"start", "end", "delta", "_ansible_delegated_vars"})
#: Facts that differ between any two runs (clock, load, ssh session ports).
VOLATILE_FACTS = frozenset({
    "ansible_date_time", "ansible_env", "ansible_uptime_seconds", "ansible_memfree_mb",
    "ansible_memory_mb", "ansible_loadavg", "ansible_user_shell_pid", "ansible_ssh_host_key_dsa_public",
    "ansible_fibre_channel_wwn", "ansible_local",
})
_TMP = re.compile(r"/[^\s\"']*\.ansible/tmp/ansible-tmp-[0-9.\-_]+[^/\s\"']*")
_SOURCE_TMP = re.compile(r"ansible-tmp-[0-9.\-_]+")


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, str):
        return _SOURCE_TMP.sub("ansible-tmp-X", _TMP.sub("<tmp>", value))
    return value


#: stat fields of files the playbook itself created a moment earlier.
FRESH_FILE_KEYS = frozenset({"atime", "ctime", "mtime", "inode", "version"})


def normalise(entry: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in entry.items() if k != "seq"}
    result = dict(out.get("result") or {})
    facts = result.get("ansible_facts")
    if isinstance(facts, dict):
        result["ansible_facts"] = {k: v for k, v in facts.items() if k not in VOLATILE_FACTS}
    stat = result.get("stat")
    if isinstance(stat, dict):
        result["stat"] = {k: v for k, v in stat.items() if k not in FRESH_FILE_KEYS}
    out["result"] = _scrub(result)
    return out


def normalise_all(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Normalised results, ordered by (task order, host) so that the order
    in which hosts finish does not matter."""
    order: Dict[str, int] = {}
    for e in results:
        order.setdefault(e["task"], len(order))
    return sorted((normalise(e) for e in results),
                  key=lambda e: (order[e["task"]], e["host"], repr(e["result"].get("item"))))
