"""Turns the figures bench/runtime.py gathered into its printed tables.

Benchmark only, controller side. Pure formatting of the results dict
(``res``, also what --json writes): it prints figures, never a verdict.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from _measure import THREADS

# Goals from the issue, shown next to the figures (no verdict is printed).
GOAL_RT_MS = 0.5
GOAL_BOOT_MS = 100.0
GOAL_BOOT_BYTES = 30000


def fmt_rt(d: Any) -> str:
    if not isinstance(d, dict) or "p50_ms" not in d:
        return "-"
    return "%.3f / %.3f" % (d["p50_ms"], d["p99_ms"])


def fmt_rate(d: Any) -> str:
    if not isinstance(d, dict) or "calls_per_s" not in d:
        return "-"
    s = "%.0f" % d["calls_per_s"]
    if d.get("errors"):
        s += " (errors)"
    return s


def fmt_num(v: Any, pattern: str) -> str:
    return pattern % v if isinstance(v, (int, float)) else "-"


def render_table(title: str, header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["", "## " + title, "  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def report(res: Dict[str, Any]) -> str:
    ms, mg = res["msvc"], res["mitogen"]
    mname = "mitogen %s" % res["meta"]["mitogen"].get("version", "") \
        if "version" in res["meta"]["mitogen"] else "mitogen"
    labels = res["meta"]["targets"]
    parts = []
    mnote = res["meta"]["mitogen"].get("error")

    def g(d: Dict[str, Any], *keys: str) -> Any:
        for k in keys:
            if not isinstance(d, dict):
                return None
            d = d.get(k)  # type: ignore[assignment]
        return d

    def mcell(key: str, *path: str, f: Callable[[Any], str]) -> str:
        if mnote:
            return "n/a"
        v = g(mg, key, *path)
        if v is None and isinstance(mg.get(key), dict) and "error" in mg[key]:
            return "error"
        return f(v)

    rows = []
    for key in labels:
        if key in res["skipped"]:
            rows.append([labels[key], "(all)", "skipped: " + res["skipped"][key], ""])
            continue
        rows.append([labels[key], "AgentService.ping", fmt_rt(g(ms, key, "rt_ping")), "n/a"])
        rows.append([labels[key], "shipped no-op fn", fmt_rt(g(ms, key, "rt_fn")),
                     mcell(key, "rt_fn", f=fmt_rt)])
    parts.append(render_table("No-op call round trip, ms (p50 / p99)",
                              ["transport", "call", "msvc", mname], rows))

    rows = []
    for key in labels:
        if key in res["skipped"]:
            continue
        rows.append([labels[key], "AgentService.ping", fmt_rate(g(ms, key, "conc_ping")), "n/a"])
        rows.append([labels[key], "shipped no-op fn", fmt_rate(g(ms, key, "conc_fn")),
                     mcell(key, "conc_fn", f=fmt_rate)])
    parts.append(render_table("Calls/s with %d concurrent caller threads" % THREADS,
                              ["transport", "call", "msvc", mname], rows))

    rows = []
    for key in labels:
        if key in res["skipped"]:
            continue
        f = g(ms, key, "file")
        if isinstance(f, dict) and "mb_per_s" in f:
            cell = "%.1f MB/s (%d MiB in %.2f s)" % (f["mb_per_s"], f["mib"], f["seconds"])
            if not f.get("complete"):
                cell += " INCOMPLETE"
        elif isinstance(f, dict) and f.get("skipped"):
            cell = "skipped: " + f["skipped"]
        elif isinstance(f, dict):
            cell = "error: %s" % f.get("error", "?")
        else:
            cell = "-"
        rows.append([labels[key], cell])
    parts.append(render_table("FileService.get_file throughput (1 MB = 10^6 bytes)",
                              ["transport", "msvc"], rows))

    rows = []
    st = res["stage2"]
    ms_fmt = (lambda v: fmt_num(v, "%.1f ms"))
    for key in labels:
        if key in res["skipped"]:
            continue
        b = g(ms, key, "boot") or {}
        lab = labels[key]
        rows.append([lab, "connect (median of %s)" % b.get("n", "?"),
                     ms_fmt(b.get("connect_ms")), mcell(key, "boot", "connect_ms", f=ms_fmt)])
        rows.append([lab, "first call on the fresh agent (median)",
                     ms_fmt(b.get("first_call_ms")),
                     mcell(key, "boot", "first_call_ms", f=ms_fmt)])
        rows.append([lab, "connect + first call (ping / os.getpid)",
                     ms_fmt(b.get("connect_first_call_ms")),
                     mcell(key, "boot", "connect_first_call_ms", f=ms_fmt)])
        if "ssh_true_ms" in b:
            rows.append([lab, "`ssh true` just before each connect",
                         ms_fmt(b.get("ssh_true_ms")), mcell(key, "boot", "ssh_true_ms", f=ms_fmt)])
            rows.append([lab, "connect minus `ssh true` (median of pairs)",
                         ms_fmt(b.get("beyond_ssh_ms")),
                         mcell(key, "boot", "beyond_ssh_ms", f=ms_fmt)])
        base = g(res, "baseline", key) or {}
        if "python_ms" in base:
            rows.append([lab, "`python3 -c pass` (start-up floor)",
                         ms_fmt(base["python_ms"]), ""])
        rows.append([lab, "bytes to agent: connect + first call",
                     fmt_num(b.get("sent_bytes"), "%d B"),
                     mcell(key, "boot", "sent_bytes", f=lambda v: fmt_num(v, "%d B"))])
        rows.append([lab, "  check: controller write() bytes, connect",
                     fmt_num(b.get("wchar_connect_bytes"), "%d B (wchar)"),
                     mcell(key, "boot", "connect_bytes",
                           f=lambda v: fmt_num(v, "%d B (streams)"))])
        tcp = g(ms, key, "tcp")
        mtcp = g(mg, key, "tcp")
        if tcp:
            rows.append([lab, "ssh TCP bytes up / down, minus `ssh true`",
                         "%d / %d B" % (tcp["up"], tcp["down"]),
                         "n/a" if mnote else ("%d / %d B" % (mtcp["up"], mtcp["down"])
                                              if mtcp and "up" in mtcp else "-")])
    rows.append(["(any)", "stage 2 + config, exact", "%d + %d = %d B" % (
        st["stage2_bytes"], st.get("config_bytes", 0),
        st["stage2_bytes"] + st.get("config_bytes", 0)), ""])
    rows.append(["(any)", "stage 2 build (once per controller)", "%.0f ms (%d modules)" % (
        st["stage2_build_ms"], st["modules"]), ""])
    parts.append(render_table("Agent bootstrap (bare agent, then one built-in call)",
                              ["transport", "figure", "msvc", mname], rows))

    goals = res.get("goals", {})
    rows = [[k, v["goal"], v["measured"]] for k, v in goals.items()]
    parts.append(render_table("Goals from the issue (figures only)", ["goal", "target", "measured"],
                              rows))
    notes = ["", "Notes:"]
    if mnote:
        notes.append("* mitogen not available: %s" % mnote)
    for key, why in res["skipped"].items():
        notes.append("* %s skipped: %s" % (labels.get(key, key), why))
    for key in labels:
        if g(ms, key, "error"):
            notes.append("* msvc %s: %s" % (labels[key], ms[key]["error"]))
        if g(mg, key, "error"):
            notes.append("* mitogen %s: %s" % (labels[key], mg[key]["error"]))
    for key in labels:
        f = g(ms, key, "file")
        if isinstance(f, dict) and f.get("why"):
            notes.append("* FileService %s skipped: %s" % (labels[key], f["why"]))
    notes.append("* 2 shared cores: figures are noisy; medians are reported.")
    return "\n".join(parts + notes)


def goals(res: Dict[str, Any]) -> Dict[str, Dict[str, str]]:
    """The issue's goals next to the matching figures (no verdict)."""
    ms = res["msvc"]
    out = {}
    rt = ms.get("local", {}).get("rt_ping", {})
    fn = ms.get("local", {}).get("rt_fn", {})
    if rt:
        out["no-op round trip, local pipes"] = {
            "goal": "< %.1f ms" % GOAL_RT_MS,
            "measured": "p50 %.3f ms (ping), %.3f ms (fn)" % (rt["p50_ms"], fn.get("p50_ms", 0))}
    boot = ms.get("local", {}).get("boot", {})
    if boot:
        out["bootstrap, local"] = {"goal": "< %.0f ms" % GOAL_BOOT_MS,
                                   "measured": "%.1f ms (python start-up alone %.1f ms)" % (
                                       boot["connect_ms"],
                                       res["baseline"]["local"]["python_ms"])}
    sboot = ms.get("ssh", {}).get("boot", {})
    if sboot:
        out["bootstrap over ssh, beyond ssh's own connect"] = {
            "goal": "< %.0f ms" % GOAL_BOOT_MS,
            "measured": "%.1f ms (connect %.1f ms, `ssh true` %.1f ms)" % (
                sboot["beyond_ssh_ms"], sboot["connect_ms"], sboot["ssh_true_ms"])}
    st = res["stage2"]
    out["bytes on the wire for bootstrap"] = {
        "goal": "< %d B" % GOAL_BOOT_BYTES,
        "measured": "%d B (stage 2 + config)" % (st["stage2_bytes"] + st.get("config_bytes", 0))}
    return out


def header_text(res: Dict[str, Any]) -> str:
    """The lines printed above the tables: date, machine, pythons, mitogen."""
    m = res["meta"]
    lines = ["# ansible_mitogen_svc runtime benchmark%s" % (" (--quick)" if m["quick"] else ""),
             "date: %s" % m["date"], "machine: %s; load average at start %s" % (
                 m["machine"], ", ".join("%.2f" % x for x in m["load_average"])),
             "controller python: %s" % m["controller_python"],
             "target python: %s" % m["target_python"]]
    mito = m.get("mitogen", {})
    if "version" in mito:
        lines.append("mitogen: %s from PyPI (%s)" % (mito["version"], mito["venv"]))
    else:
        lines.append("mitogen: not available (%s)" % mito.get("error"))
    return "\n".join(lines)
