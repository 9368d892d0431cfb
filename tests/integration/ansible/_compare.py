"""Normalise captured task results so vanilla and mitogen runs compare equal.

Test-only, controller side. Only fields that legitimately differ between
two runs are removed: timings, temp paths and per-connection facts (remote
and controller temp dirs, copy's controller temp file, backup file names),
async job ids.

The scenario suite (test_scenarios.py) adds per-host result sequences, the
linear step order and readable first-difference reports.
"""
from __future__ import annotations

import difflib
import json
import re
from typing import Any, Dict, List, Optional, Tuple

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
#: The controller's per-process temp dir and the temp file or dir Ansible
#: makes in it (copy content= "src", a rendered template's diff header).
_LOCAL_TMP = re.compile(r"/ansible-local-[0-9]+[a-z0-9_]+(/tmp[a-z0-9_]{8}(?=/)|/\.[a-z0-9_]{8}\b)?")
#: The target temp dir an AnsiballZ wrapper unpacks its zip to (tracebacks).
_PAYLOAD_TMP = re.compile(r"/(ansible_[\w.]+_payload_)[a-z0-9_]{8}(?=/)")
#: A backup file name: "<path>.<pid>.<date>@<time>~".
_BACKUP = re.compile(r"\.[0-9]+\.[0-9]{4}-[0-9]{2}-[0-9]{2}@[0-9]{2}:[0-9]{2}:[0-9]{2}~")
#: An async job id (random), also in its ``results_file``.
JOB_ID = re.compile(r"\bj\d+\.\d+\b")
#: copy content= on ansible-core <= 2.19 reports the controller temp file's
#: random name as the module argument ``_original_basename``.
_TEMP_BASENAME = re.compile(r"^\.[a-z0-9_]{8}$")


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (".TMP" if k == "_original_basename" and isinstance(v, str)
                    and _TEMP_BASENAME.match(v) else _scrub(v))
                for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, str):
        value = _BACKUP.sub(".PID.DATE@TIME~", _LOCAL_TMP.sub("/ansible-local-X/TMP", value))
        value = JOB_ID.sub("j<jid>", _PAYLOAD_TMP.sub(r"/\1X", value))
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


# -- scenario suite (test_scenarios.py) ------------------------------------------
#: Task names of the scenario playbooks start with their scenario's id, "s07 ...".
_SCENARIO_ID = re.compile(r"^(s\d\d) ")


def scenario_id(task_name: str) -> str:
    """"s07" for a task named "s07 copy in check mode", "" for any other."""
    m = _SCENARIO_ID.match(task_name or "")
    return m.group(1) if m else ""


def per_host(results: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Normalised results of each host in the order the host produced them.

    Under every strategy one host runs its tasks in playbook order, so these
    sequences compare equal across strategies when the behaviour is equal."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for e in sorted(results, key=lambda e: e["seq"]):
        out.setdefault(e["host"], []).append(normalise(e))
    return out


def task_order(results: List[Dict[str, Any]]) -> List[Tuple[str, Tuple[str, ...]]]:
    """The run as consecutive (task, hosts) steps, e.g. serial batches.

    Under ``linear`` every host finishes a task before any starts the next,
    so this is deterministic; hosts inside one step come in any order."""
    steps: List[Tuple[str, List[str]]] = []
    for e in sorted(results, key=lambda e: e["seq"]):
        if steps and steps[-1][0] == e["task"] and e["host"] not in steps[-1][1]:
            steps[-1][1].append(e["host"])
        else:
            steps.append((e["task"], [e["host"]]))
    return [(task, tuple(sorted(hosts))) for task, hosts in steps]


def _pretty(value: Any) -> List[str]:
    return json.dumps(value, indent=1, sort_keys=True, default=repr).splitlines()


def _clip(line: str, width: int = 400) -> str:
    return line if len(line) <= width else "%s...(%d chars)" % (line[:width], len(line))


def compact_diff(a: Any, b: Any, limit: int = 40, labels: Tuple[str, str] = ("vanilla", "mitogen")
                 ) -> str:
    """A unified diff of two JSON values, at most ``limit`` lines."""
    lines = [_clip(ln) for ln in difflib.unified_diff(_pretty(a), _pretty(b), labels[0],
                                                      labels[1], n=2, lineterm="")]
    if len(lines) > limit:
        lines = lines[:limit] + ["... (%d more diff lines)" % (len(lines) - limit)]
    return "\n".join(lines)


def first_difference(a: List[Dict[str, Any]], b: List[Dict[str, Any]],
                     labels: Tuple[str, str] = ("vanilla", "mitogen")) -> Optional[str]:
    """Describe where two normalised result sequences of one host first
    differ, or None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            head = "result #%d, task %r" % (i + 1, x.get("task"))
            if y.get("task") != x.get("task"):
                head += " (%s has task %r here)" % (labels[1], y.get("task"))
            head += ": status %s / %s" % (x.get("status"), y.get("status"))
            return head + "\n" + compact_diff(x, y, labels=labels)
    if len(a) != len(b):
        longer, name = (a, labels[0]) if len(a) > len(b) else (b, labels[1])
        extra = [e.get("task") for e in longer[min(len(a), len(b)):]]
        return "%d vs %d results; only %s has: %s" % (len(a), len(b), name, extra[:8])
    return None


def substitute(value: Any, mapping: Dict[str, str]) -> Any:
    """``value`` with every occurrence of each key of ``mapping`` in its
    strings replaced by the key's value (e.g. a run's own scratch directory
    by a placeholder all runs share)."""
    if isinstance(value, dict):
        return {k: substitute(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, mapping) for v in value]
    if isinstance(value, str):
        for old, new in mapping.items():
            value = value.replace(old, new)
    return value
