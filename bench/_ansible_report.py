"""Tables and chart of bench/ansible.py, from its results dict (also what
``--json`` writes, so ``--chart-from`` can redraw them later).

Benchmark only, controller side, stdlib only. Figures and ratios, no
verdict beyond "goal met or not" next to each goal of the issue. The chart
is plain SVG written by hand.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Tuple
from xml.sax.saxutils import escape

STRATEGIES = ("vanilla", "mitogen")
METRICS = ("wall_s", "controller_cpu_s", "target_cpu_s", "bytes", "up_bursts",
           "round_trips_per_task")
#: (scenario, metric, highest mitogen/vanilla ratio that meets it, text)
GOALS: List[Tuple[str, str, float, str]] = [
    ("playbook_0ms", "wall_s", 1 / 4, ">= 4x faster at 0 ms"),
    ("playbook_20ms", "wall_s", 1 / 6, ">= 6x faster at 20 ms"),
    ("playbook_0ms", "controller_cpu_s", 0.6, "controller CPU <= 0.6x (0 ms)"),
    ("playbook_20ms", "controller_cpu_s", 0.6, "controller CPU <= 0.6x (20 ms)"),
    ("playbook_0ms", "target_cpu_s", 0.08, "target CPU <= 0.08x (0 ms)"),
    ("playbook_20ms", "target_cpu_s", 0.08, "target CPU <= 0.08x (20 ms)"),
    ("ping_0ms", "wall_s", 1.0, "ping no slower than vanilla (0 ms)"),
    ("ping_20ms", "wall_s", 1.0, "ping no slower than vanilla (20 ms)"),
]


def ordered(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Scenarios in run order: the playbook, then ping, each by RTT (the
    JSON keeps its keys sorted, so its order cannot be relied on)."""
    return [sc for _, sc in sorted(res["scenarios"].items(), key=lambda kv: (
        kv[1].get("tool") != "ansible-playbook", kv[1].get("rtt_ms", 0.0), kv[0]))]


def _value(run: Dict[str, Any], metric: str) -> Optional[float]:
    if metric == "bytes":
        return float(run.get("bytes_up", 0) + run.get("bytes_down", 0))
    v = run.get(metric)
    return float(v) if isinstance(v, (int, float)) else None


def summarise(res: Dict[str, Any]) -> None:
    """Add ``median``, ``range``, ``ratio`` and ``results`` to each scenario
    and the ``goals`` list to ``res``. Only successful runs count."""
    for sc in res["scenarios"].values():
        sc["median"], sc["range"], sc["ratio"], sc["results"] = {}, {}, {}, {}
        for strategy in STRATEGIES:
            runs = [r for r in sc["runs"][strategy] if r.get("ok")]
            med: Dict[str, Any] = {"n": len(runs)}
            rng: Dict[str, Any] = {}
            for metric in METRICS:
                xs = [x for x in (_value(r, metric) for r in runs) if x is not None]
                if xs:
                    med[metric] = statistics.median(xs)
                    rng[metric] = [min(xs), max(xs)]
            sc["median"][strategy], sc["range"][strategy] = med, rng
            matches = [r.get("results_match") for r in sc["runs"][strategy]]
            failed = len(sc["runs"][strategy]) - len(runs)
            if failed:
                sc["results"][strategy] = "%d of %d runs failed" % (failed, len(matches))
            elif all(m is True for m in matches):
                sc["results"][strategy] = "same"
            elif any(m is False for m in matches):
                diffs = [r.get("results_diff") for r in sc["runs"][strategy] if r.get("results_diff")]
                sc["results"][strategy] = "differ: %s" % (diffs[0] if diffs else "?")
            else:
                sc["results"][strategy] = "not compared"
        v, m = sc["median"]["vanilla"], sc["median"]["mitogen"]
        for metric in METRICS:
            if v.get(metric) and m.get(metric) is not None:
                sc["ratio"][metric] = m[metric] / v[metric]
    goals = []
    for key, metric, limit, text in GOALS:
        ratio = res["scenarios"].get(key, {}).get("ratio", {}).get(metric)
        goals.append({"scenario": key, "metric": metric, "limit": limit, "goal": text,
                      "ratio": ratio, "met": None if ratio is None else ratio <= limit})
    res["goals"] = goals


# -- markdown ---------------------------------------------------------------------

def _f(v: Any, pattern: str) -> str:
    return pattern % v if isinstance(v, (int, float)) else "-"


def _ratio(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return "%.2fx" % v if v >= 0.095 else "%.3fx" % v


def _table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def markdown(res: Dict[str, Any]) -> str:
    meta = res["meta"]
    p = meta["params"]
    labels = meta.get("labels", {"vanilla": "vanilla", "mitogen": "mitogen"})
    parts = [
        "Run %s%s: %s; %s; targets %s; %d hosts, %d round(s) per RTT, %d ping(s); "
        "load average %.1f at the start, %.1f at the end; took %.0f s. Collection: %s."
        % (meta["date"], " (--quick)" if p.get("quick") else "", meta["machine"],
           meta["ansible"], meta.get("target_python", "?"), p["hosts"], p["rounds"],
           p["ping_reps"], meta["load_average"][0], meta.get("load_average_end", [0])[0],
           meta.get("duration_s", 0.0), meta.get("collection", "?")),
        "",
    ]
    rows = []
    for sc in ordered(res):
        for strategy in STRATEGIES:
            m = sc["median"][strategy]
            rows.append([sc["label"], labels[strategy] + (" (n=%d)" % m["n"]),
                         _f(m.get("wall_s"), "%.2f"), _f(m.get("controller_cpu_s"), "%.2f"),
                         _f(m.get("target_cpu_s"), "%.2f"),
                         _f(m.get("bytes", 0) / 1e6 if "bytes" in m else None, "%.2f"),
                         _f(m.get("round_trips_per_task"), "%.1f"), sc["results"][strategy]])
        r = sc["ratio"]
        rows.append(["", "**mitogen / vanilla**"] + ["**%s**" % _ratio(r.get(k)) for k in
                    ("wall_s", "controller_cpu_s", "target_cpu_s", "bytes",
                     "round_trips_per_task")] + [""])
    parts.append(_table(["scenario", "strategy", "wall s", "controller CPU s", "target CPU s",
                         "MB on the wire", "round trips per task", "task results"], rows))
    parts += ["", "Goals of the issue (mitogen / vanilla, medians):", ""]
    grows = []
    for g in res.get("goals", []):
        met = "-" if g["met"] is None else ("yes" if g["met"] else "no")
        speed = ""
        if g["metric"] == "wall_s" and g["ratio"]:
            speed = " (%.2fx as fast)" % (1 / g["ratio"])
        grows.append([g["goal"], "<= " + _ratio(g["limit"]), _ratio(g["ratio"]) + speed, met])
    parts.append(_table(["goal", "ratio needed", "measured", "met?"], grows))
    parts += ["", "Every run:", ""]
    rrows = []
    for sc in ordered(res):
        runs = sorted(sc["runs"]["vanilla"] + sc["runs"]["mitogen"],
                      key=lambda r: r.get("seq", 0))
        for r in runs:
            rrows.append([sc["label"], str(r.get("round")), labels[r["strategy"]],
                          _f(r.get("wall_s"), "%.2f"), _f(r.get("controller_cpu_s"), "%.2f"),
                          _f(r.get("target_cpu_s"), "%.2f"),
                          _f((r.get("bytes_up", 0) + r.get("bytes_down", 0)) / 1e6, "%.2f"),
                          _f(r.get("up_bursts"), "%d"), _f(r.get("connections"), "%d"),
                          "ok" if r.get("ok") else "rc=%s" % r.get("rc")])
    parts.append(_table(["scenario", "round", "strategy", "wall s", "controller CPU s",
                         "target CPU s", "MB", "up bursts", "TCP connections", "exit"], rrows))
    return "\n".join(parts)


# -- SVG chart ---------------------------------------------------------------------

_GREY, _BLUE, _LIGHT, _DARK, _RED = "#9aa0a6", "#1f6fb2", "#7fb3de", "#1f4e79", "#c0392b"


def _text(x: float, y: float, s: str, size: int = 11, anchor: str = "middle",
          weight: str = "normal", fill: str = "#222") -> str:
    return ('<text x="%.1f" y="%.1f" font-size="%d" text-anchor="%s" font-weight="%s" '
            'fill="%s">%s</text>' % (x, y, size, anchor, weight, fill, escape(s)))


def _rect(x: float, y: float, w: float, h: float, fill: str) -> str:
    return '<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>' % (x, y, w, h, fill)


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str = "#444",
          width: float = 1.0, dash: str = "") -> str:
    extra = ' stroke-dasharray="%s"' % dash if dash else ""
    return ('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="%.1f"%s/>'
            % (x1, y1, x2, y2, stroke, width, extra))


def _nice_max(v: float) -> float:
    """The smallest of 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 (times a power of
    ten) that is at least ``v``."""
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if v <= m * exp * 1.000001:
            return m * exp
    return 10 * exp


def _divisions(ymax: float) -> int:
    """How many grid steps split 0..ymax into round numbers."""
    for n in (5, 4, 6, 3):
        step = ymax / n
        mant = step / 10 ** math.floor(math.log10(step))
        if any(abs(mant - m) < 1e-6 for m in (1, 2, 2.5, 5)):
            return n
    return 5


_STEPS = (1, 2, 5)


def _log_bounds(lo: float, hi: float) -> Tuple[float, float]:
    """Snap ``lo`` down and ``hi`` up to 1-2-5 values."""
    def values(e: int) -> List[float]:
        return [m * 10.0 ** e for m in _STEPS]
    down = max(v for e in range(math.floor(math.log10(lo)) - 1, math.floor(math.log10(lo)) + 1)
               for v in values(e) if v <= lo * 1.000001)
    up = min(v for e in range(math.floor(math.log10(hi)), math.floor(math.log10(hi)) + 2)
             for v in values(e) if v >= hi / 1.000001)
    return down, up


def svg(res: Dict[str, Any]) -> str:
    """Two panels: median wall time of the playbook per RTT (seconds), and
    mitogen/vanilla ratios of every metric on a log scale with the goals."""
    W, H = 960, 440
    top, bottom = 70, 360
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif">' % (W, H, W, H),
           _rect(0, 0, W, H, "#ffffff")]
    meta = res["meta"]
    p = meta["params"]
    out.append(_text(W / 2, 24, "mitogen.svc: mitogen_linear vs vanilla linear "
                     "(bench/ansible.py)", 15, weight="bold"))
    out.append(_text(W / 2, 42, "%s, %s, %d hosts, median of %d round(s)%s" % (
        meta["date"], meta["ansible"], p["hosts"], p["rounds"],
        ", --quick" if p.get("quick") else ""), 11, fill="#555"))
    scen = res["scenarios"]
    labels = meta.get("labels", {"vanilla": "vanilla", "mitogen": "mitogen"})

    # Panel 1: wall seconds of the playbook.
    pb = [k for k in sorted(scen, key=lambda k: scen[k].get("rtt_ms", 0.0))
          if k.startswith("playbook_")]
    x0, x1 = 60, 330
    vmax = max([scen[k]["median"][s].get("wall_s", 0) for k in pb for s in STRATEGIES] + [1])
    ymax = _nice_max(vmax * 1.05)
    out.append(_text((x0 + x1) / 2, top - 10, "playbook wall time, s (lower is better)", 12,
                     weight="bold"))

    def y1(v: float) -> float:
        return bottom - (bottom - top) * v / ymax

    divisions = _divisions(ymax)
    for i in range(divisions + 1):
        v = ymax * i / divisions
        out.append(_line(x0, y1(v), x1, y1(v), "#e3e3e3"))
        out.append(_text(x0 - 6, y1(v) + 4, "%g" % round(v, 2), 10, "end", fill="#555"))
    out.append(_line(x0, bottom, x1, bottom))
    group_w = (x1 - x0) / max(1, len(pb))
    for gi, key in enumerate(pb):
        gx = x0 + gi * group_w
        bw = group_w * 0.3
        for si, strategy in enumerate(STRATEGIES):
            v = scen[key]["median"][strategy].get("wall_s")
            if v is None:
                continue
            bx = gx + group_w * 0.18 + si * (bw + 4)
            out.append(_rect(bx, y1(v), bw, bottom - y1(v), _GREY if si == 0 else _BLUE))
            out.append(_text(bx + bw / 2, y1(v) - 4, "%.1f" % v, 10))
        out.append(_text(gx + group_w / 2, bottom + 16, "%g ms RTT" % scen[key]["rtt_ms"], 11))
        ratio = scen[key]["ratio"].get("wall_s")
        if ratio:
            out.append(_text(gx + group_w / 2, bottom + 30, "%.2fx as fast" % (1 / ratio), 10,
                             fill=_BLUE))
    ly = bottom + 52
    out.append(_rect(x0, ly - 9, 10, 10, _GREY))
    out.append(_text(x0 + 14, ly, labels["vanilla"], 11, "start"))
    out.append(_rect(x0 + 120, ly - 9, 10, 10, _BLUE))
    out.append(_text(x0 + 134, ly, labels["mitogen"], 11, "start"))

    # Panel 2: ratios, log scale.
    groups = [("wall_s", "playbook", "playbook\nwall time"),
              ("controller_cpu_s", "playbook", "controller\nCPU"),
              ("target_cpu_s", "playbook", "target\nCPU"),
              ("bytes", "playbook", "bytes on\nthe wire"),
              ("round_trips_per_task", "playbook", "round\ntrips"),
              ("wall_s", "ping", "ping\nwall time")]
    rtts = sorted({sc["rtt_ms"] for sc in scen.values()})
    ratios = [v for sc in scen.values() for v in sc["ratio"].values() if v and v > 0]
    limits = [g["limit"] for g in res.get("goals", [])]
    lo, hi = _log_bounds(min(ratios + limits + [0.5]) / 1.3, max(ratios + [1.0]) * 1.3)
    lo_l, hi_l = math.log10(lo), math.log10(hi)
    x0, x1 = 420, 945
    out.append(_text((x0 + x1) / 2, top - 10, "mitogen / vanilla, log scale (below 1: better)",
                     12, weight="bold"))

    def y2(v: float) -> float:
        return bottom - (bottom - top) * (math.log10(v) - lo_l) / (hi_l - lo_l)

    for e in range(math.floor(lo_l), math.ceil(hi_l) + 1):
        for mult in _STEPS:
            v = mult * 10.0 ** e
            if not lo / 1.000001 <= v <= hi * 1.000001:
                continue
            out.append(_line(x0, y2(v), x1, y2(v), "#d0d0d0" if mult == 1 else "#eeeeee"))
            out.append(_text(x0 - 6, y2(v) + 4, "%g" % v, 10, "end", fill="#555"))
    out.append(_line(x0, y2(1.0), x1, y2(1.0), "#333", 1.5))
    group_w = (x1 - x0) / len(groups)
    shades = [_LIGHT, _DARK, "#5b8fc7", "#0b2a45"]
    for gi, (metric, prefix, title) in enumerate(groups):
        gx = x0 + gi * group_w
        bw = group_w * 0.7 / max(1, len(rtts))
        for ri, rtt in enumerate(rtts):
            key = "%s_%gms" % (prefix, rtt)
            sc = scen.get(key)
            if not sc:
                continue
            v = sc["ratio"].get(metric)
            bx = gx + group_w * 0.15 + ri * bw
            if v and v > 0:
                ya, yb = sorted((y2(1.0), y2(v)))
                out.append(_rect(bx + 1, ya, bw - 2, max(1.0, yb - ya), shades[ri % len(shades)]))
                ty = y2(v) + (12 if v < 1 else -4)
                out.append(_text(bx + bw / 2, ty, _ratio(v), 9))
            for g in res.get("goals", []):
                if g["scenario"] == key and g["metric"] == metric:
                    gy = y2(g["limit"])
                    out.append(_line(bx - 1, gy, bx + bw + 1, gy, _RED, 2.0))
        for li, word in enumerate(title.split("\n")):
            out.append(_text(gx + group_w / 2, bottom + 16 + 13 * li, word, 10))
    ly = bottom + 52
    lx = x0
    for ri, rtt in enumerate(rtts):
        out.append(_rect(lx, ly - 9, 10, 10, shades[ri % len(shades)]))
        out.append(_text(lx + 14, ly, "%g ms RTT" % rtt, 11, "start"))
        lx += 95
    out.append(_line(lx, ly - 4, lx + 14, ly - 4, _RED, 2.0))
    out.append(_text(lx + 18, ly, "goal of the issue", 11, "start"))
    out.append(_text(W / 2, H - 10, "Figures: docs/benchmarks.md. Controller and target CPU "
                     "include every process of the run; round trips: up bursts per task and host.",
                     10, fill="#666"))
    out.append("</svg>")
    return "\n".join(out) + "\n"
