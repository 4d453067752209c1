"""fastdl-bench --compare A.json B.json: the per-op change from run A to run B.

Rows are matched by (suite, case). The judgement uses fastdl's speedup over the torch variants
(geometric mean over the variants both runs share), a ratio measured side by side in each run and
so robust to a machine that is slower or busier as a whole; fastdl's own time change is printed
beside it. A row without torch variants is judged on fastdl's time. A change beyond `threshold`
(relative) is a regression or an improvement; rows either run marked unreliable are labelled
and reported, but do not fail the comparison (their change may be noise). The exit status is 1
when a reliable row regressed or a case of A is missing from B ("gone": a suite or case that no
longer runs must not pass silently). Runs that differ in device, threads, --quick or machine are
compared with a warning: their ratios are not like for like.
"""
from __future__ import annotations

import json
import math

from .harness import SPREAD_LIMIT

# Each run's rows may themselves vary by up to SPREAD_LIMIT (above it a row is unreliable), so a
# threshold equal to it would flag noise: a change must exceed twice that to count.
DEFAULT_THRESHOLD = 2 * SPREAD_LIMIT
# Run settings whose difference makes the two runs' figures not like for like.
_SETTINGS = ("device", "threads", "quick", "machine")


def load(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"fastdl-bench --compare: cannot read {path}: {e}")
    if not isinstance(doc, dict) or "rows" not in doc:
        raise SystemExit(f"fastdl-bench --compare: {path} has no 'rows' (not a fastdl-bench JSON)")
    return doc


def compare_rows(rows_a: list, rows_b: list, threshold: float = DEFAULT_THRESHOLD) -> list:
    """One entry per case in both runs: time ratio B/A, speedup ratio B/A, verdict."""
    a = {(r["suite"], r["case"]): r for r in rows_a}
    out = []
    for r in rows_b:
        key = (r["suite"], r["case"])
        if key not in a:
            out.append({"suite": key[0], "case": key[1], "verdict": "new"})
            continue
        ra = a[key]
        time_ratio = r["fastdl_ms"] / ra["fastdl_ms"]
        common = [n for n in r.get("speedup", {}) if n in ra.get("speedup", {})]
        speedup_ratio = None
        if common:
            speedup_ratio = math.exp(sum(math.log(r["speedup"][n] / ra["speedup"][n])
                                         for n in common) / len(common))
            change = 1.0 / speedup_ratio   # >1: fastdl lost ground against torch
        else:
            change = time_ratio
        verdict = "same"
        if change > 1 + threshold:
            verdict = "REGRESSION"
        elif change < 1 / (1 + threshold):
            verdict = "improved"
        out.append({"suite": key[0], "case": key[1], "time_ratio": time_ratio,
                    "speedup_ratio": speedup_ratio, "verdict": verdict,
                    "unreliable": bool(r.get("unreliable") or ra.get("unreliable"))})
    b_keys = {(r["suite"], r["case"]) for r in rows_b}
    out += [{"suite": k[0], "case": k[1], "verdict": "gone"} for k in a if k not in b_keys]
    return out


def setting_warnings(meta_a: dict, meta_b: dict) -> list:
    """One line per run setting that differs between A and B."""
    return [f"warning: the runs differ in {k} (A {meta_a.get(k, '?')}, B {meta_b.get(k, '?')}): "
            "the ratios are not like for like" for k in _SETTINGS
            if meta_a.get(k) != meta_b.get(k)]


def failures(entries: list) -> tuple:
    """(reliable regressions, unreliable regressions, gone cases)."""
    reg = [e for e in entries if e["verdict"] == "REGRESSION"]
    return ([e for e in reg if not e.get("unreliable")], [e for e in reg if e.get("unreliable")],
            [e for e in entries if e["verdict"] == "gone"])


def format_comparison(entries: list, meta_a: dict, meta_b: dict) -> str:
    def tag(m):
        return f"{m.get('commit', '?')} {m.get('date', '?')} {m.get('device', '?')}"
    lines = [f"A: {tag(meta_a)}", f"B: {tag(meta_b)}"] + setting_warnings(meta_a, meta_b)
    lines.append(f"{'suite':<8} {'case':<36} {'time B/A':>9} {'speedup B/A':>12}  verdict")
    for e in entries:
        t = f"{e['time_ratio']:.2f}x" if "time_ratio" in e else "-"
        s = f"{e['speedup_ratio']:.2f}x" if e.get("speedup_ratio") else "-"
        v = e["verdict"] + (" (unreliable)" if e.get("unreliable") else "")
        lines.append(f"{e['suite']:<8} {e['case']:<36} {t:>9} {s:>12}  {v}")
    reg, noisy, gone = failures(entries)
    lines.append(f"{len(reg)} regression(s)" if reg else "no regressions")
    if noisy:
        lines.append(f"{len(noisy)} more in unreliable rows (reported, not counted)")
    if gone:
        lines.append(f"FAIL: {len(gone)} case(s) of A missing from B: "
                     + ", ".join(f"{e['suite']}/{e['case']}" for e in gone))
    return "\n".join(lines)


def main(path_a: str, path_b: str, threshold: float = DEFAULT_THRESHOLD) -> int:
    a, b = load(path_a), load(path_b)
    entries = compare_rows(a["rows"], b["rows"], threshold)
    print(format_comparison(entries, a.get("meta", {}), b.get("meta", {})))
    reg, _, gone = failures(entries)
    return 1 if reg or gone else 0
