"""fastdl-bench --report DIR: results.json, report.md and one PNG chart per op family (suite).

Each chart has two panels per case: fastdl's speedup over every torch variant (>1: fastdl faster),
and each side's achieved fraction of the machine's limit (the bandwidth tier for memory-bound
rows, the FMA peak for compute-bound ones). The caption names device, versions, commit and date.
Sides above 100% of their limit are measuring errors and are left out of the fraction panel;
cases with a spread above the limit are marked '?'. Families are whatever suites the run holds,
so a new suite needs no change here. matplotlib is the optional extra fastdl[report], imported
only here (Agg canvas, no pyplot: the caller's backend is left alone).
"""
from __future__ import annotations

import json
import os


def check_available():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("fastdl-bench --report needs matplotlib: pip install 'fastdl[report]'")


def caption(meta: dict) -> str:
    dev = meta.get("gpu") if meta.get("device") == "cuda" else meta.get("machine", "cpu")
    lim = meta.get("limits", {})
    parts = [f"{meta.get('device', '?')}: {dev}, {meta.get('threads', '?')} threads",
             f"fastdl {meta.get('fastdl', '?')} ({meta.get('commit', '?')}), "
             f"torch {meta.get('torch', '?')}, python {meta.get('python', '?')}",
             f"{meta.get('date', '?')}" + (" (--quick)" if meta.get("quick") else "")]
    if lim.get("bandwidth_GBps"):
        parts.append(f"limits: {lim.get('bandwidth_name', 'bandwidth')} "
                     f"{lim['bandwidth_GBps']:.1f} GB/s"
                     + (f", FMA peak {lim['peak_GFLOPs']:.0f} GFLOP/s"
                        if lim.get("peak_GFLOPs") else ""))
    return "; ".join(parts)


def families(rows: list) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["suite"], []).append(r)
    return out


def _label(r: dict) -> str:
    return r["case"] + (" ?" if r.get("unreliable") else "")


def chart(suite: str, rows: list, meta: dict, path: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = []
    for r in rows:
        variants += [v for v in r["speedup"] if v not in variants]
    sides = ["fastdl"] + variants
    n = len(rows)
    fig = Figure(figsize=(13, 1.2 + 0.45 * n * max(1, len(sides)) ** 0.5 + 1.0))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    ys = list(range(n))
    h = 0.8 / max(1, len(variants))
    for j, v in enumerate(variants):
        vals = [r["speedup"].get(v, 1.0) for r in rows]
        # Bars start at 1x: right of the line fastdl is faster, left of it slower.
        ax1.barh([y - 0.4 + h * (j + 0.5) for y in ys], [x - 1.0 for x in vals], left=1.0,
                 height=h, label=v, color=f"C{j + 1}")
    ax1.axvline(1.0, color="black", lw=0.8)
    ax1.set_xscale("log")
    ax1.set_xlabel("speedup of fastdl over torch (x, log scale; >1: fastdl faster)")
    ax1.set_yticks(ys)
    ax1.set_yticklabels([_label(r) for r in rows], fontsize=8)
    ax1.invert_yaxis()
    ax1.legend(fontsize=7, loc="best")
    h2 = 0.8 / len(sides)
    for j, s in enumerate(sides):
        vals = []
        for r in rows:
            f = r.get("frac", {}).get(s)
            vals.append(0.0 if f is None or s in r.get("limit_error", []) else 100 * f)
        ax2.barh([y - 0.4 + h2 * (j + 0.5) for y in ys], vals, height=h2, label=s,
                 color=f"C{j}")   # fastdl C0, variants the colours of the speedup panel
    for y, r in zip(ys, rows):
        tier = r.get("limit", {}).get("tier", "no limit")
        err = " LIMIT ERROR" if r.get("limit_error") else ""
        ax2.text(101, y, f"{tier}{err}", va="center", fontsize=7)
    ax2.axvline(100, color="black", lw=0.8)
    ax2.set_xlim(0, 130)
    ax2.set_xlabel("% of the machine's limit (bandwidth tier or FMA peak)")
    ax2.legend(fontsize=7, loc="best")
    fig.suptitle(f"fastdl-bench: {suite}", fontsize=11)
    fig.text(0.01, 0.005, caption(meta), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=110)


def markdown(doc: dict, charts: dict) -> str:
    meta, rows = doc["meta"], doc["rows"]
    lines = ["# fastdl-bench report", "", caption(meta), ""]
    lines += ["| suite | case | fastdl ms | spread | speedup vs torch | rate | % of limit "
              "(fastdl / best torch) | limit | flags |",
              "|---|---|---:|---:|---|---:|---:|---|---|"]
    for r in rows:
        sp = ", ".join(f"{v} {x:.2f}x" for v, x in r["speedup"].items())
        rate = (f"{r['GB/s']:.1f} GB/s" if "GB/s" in r else
                f"{r['GFLOP/s']:.1f} GFLOP/s" if "GFLOP/s" in r else "")
        fr = r.get("frac", {})
        err = r.get("limit_error", [])
        pct = ""
        if fr:
            fd = "error" if "fastdl" in err else f"{100 * fr['fastdl']:.0f}%"
            tv = [f for s, f in fr.items() if s != "fastdl" and s not in err]
            pct = fd + (f" / {100 * max(tv):.0f}%" if tv else "")
        flags = []
        few = r.get("too_few_timings")
        if few:
            flags.append(f"unreliable ({r.get('reps', '?')} timings: spread not measured)")
        elif r.get("unreliable"):
            flags.append(f"unreliable (spread {100 * r['spread']:.0f}%)")
        if err:
            flags.append("above 100% of limit: " + ", ".join(err))
        if r.get("flops_equivalent"):
            flags.append("direct-convolution FLOPs (Winograd passes do fewer)")
        spread_txt = "n/a" if few else f"{100 * r['spread']:.0f}%"
        lines.append(f"| {r['suite']} | {r['case']} | {r['fastdl_ms']:.3f} | "
                     f"{spread_txt} | {sp} | {rate} | {pct} | "
                     f"{r.get('limit', {}).get('tier', '')} | {'; '.join(flags)} |")
    lines.append("")
    lines.append("Limits: `dram` = best of read/write/copy/triad/update on a footprint well "
                 "beyond the last-level cache; `cache@<size>` / `mem@<size>` = the same kernels at "
                 "that footprint, the largest not above the row's working set (`cache@`: the "
                 "working set fits in the last-level cache, a cache-hot row); `fma` = peak FMA "
                 "rate.")
    lines.append("")
    for suite, path in charts.items():
        lines += [f"## {suite}", "", f"![{suite}]({os.path.basename(path)})", ""]
    return "\n".join(lines)


def write(doc: dict, out_dir: str) -> list:
    """Writes results.json (with a 'families' entry per suite), report.md and <suite>.png."""
    check_available()
    os.makedirs(out_dir, exist_ok=True)
    fams = families(doc["rows"])
    charts = {}
    for suite, rows in fams.items():
        path = os.path.join(out_dir, f"{suite}.png")
        chart(suite, rows, doc["meta"], path)
        charts[suite] = path
    doc = dict(doc, families={s: {"cases": [r["case"] for r in rows],
                                  "chart": os.path.basename(charts[s])}
                              for s, rows in fams.items()})
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "report.md")]
    with open(paths[0], "w") as f:
        json.dump(doc, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(doc, charts))
    return paths + list(charts.values())
