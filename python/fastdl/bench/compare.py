"""fastdl-bench --compare A.json B.json: the per-op change from run A to run B.

Rows are matched by (suite, case). The judgement uses fastdl's speedup over the torch variants
(geometric mean over the variants both runs share), a ratio measured side by side in each run and
so robust to a machine that is slower or busier as a whole; fastdl's own time change is printed
beside it. A row without torch variants is judged on fastdl's time. A change beyond `threshold`
(relative) is a regression or an improvement; rows either run marked unreliable are labelled.
"""
from __future__ import annotations

import json
import math


def load(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"fastdl-bench --compare: cannot read {path}: {e}")
    if not isinstance(doc, dict) or "rows" not in doc:
        raise SystemExit(f"fastdl-bench --compare: {path} has no 'rows' (not a fastdl-bench JSON)")
    return doc


def compare_rows(rows_a: list, rows_b: list, threshold: float = 0.25) -> list:
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


def format_comparison(entries: list, meta_a: dict, meta_b: dict) -> str:
    def tag(m):
        return f"{m.get('commit', '?')} {m.get('date', '?')} {m.get('device', '?')}"
    lines = [f"A: {tag(meta_a)}", f"B: {tag(meta_b)}",
             f"{'suite':<8} {'case':<36} {'time B/A':>9} {'speedup B/A':>12}  verdict"]
    for e in entries:
        t = f"{e['time_ratio']:.2f}x" if "time_ratio" in e else "-"
        s = f"{e['speedup_ratio']:.2f}x" if e.get("speedup_ratio") else "-"
        v = e["verdict"] + (" (unreliable)" if e.get("unreliable") else "")
        lines.append(f"{e['suite']:<8} {e['case']:<36} {t:>9} {s:>12}  {v}")
    n = sum(e["verdict"] == "REGRESSION" for e in entries)
    lines.append(f"{n} regression(s)" if n else "no regressions")
    return "\n".join(lines)


def main(path_a: str, path_b: str, threshold: float = 0.25) -> int:
    a, b = load(path_a), load(path_b)
    entries = compare_rows(a["rows"], b["rows"], threshold)
    print(format_comparison(entries, a.get("meta", {}), b.get("meta", {})))
    return 1 if any(e["verdict"] == "REGRESSION" for e in entries) else 0
