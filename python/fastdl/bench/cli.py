"""fastdl-bench: every benchmark suite on one device against torch, one table at the end.

    fastdl-bench                      # all suites on the CPU (about 5 minutes on 2 cores)
    fastdl-bench --device cuda        # the same on the GPU
    fastdl-bench --suite optim --json results.json
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import subprocess
import sys

# Suite name -> module in fastdl.bench. Later kernel families add their suites here.
SUITES = ["optim", "gemm", "pool", "rnn"]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastdl-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="device to benchmark (default: cpu)")
    ap.add_argument("--suite", action="append", choices=SUITES,
                    help="run only these suites (repeatable; default: all)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw figures to PATH")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of measurement per case (default 2 on cpu, 1 on cuda)")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter cases (a smoke run)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    import torch

    import fastdl
    from . import harness, machine

    device = args.device or "cpu"
    if device == "cuda" and not (fastdl.cuda.is_available() and torch.cuda.is_available()):
        print("fastdl-bench: --device cuda needs a CUDA build of fastdl and a visible GPU "
              f"(fastdl.cuda.is_available()={fastdl.cuda.is_available()}, "
              f"torch.cuda.is_available()={torch.cuda.is_available()})", file=sys.stderr)
        return 2
    budget = args.budget if args.budget is not None else (1.0 if device == "cuda" else 2.0)
    if args.quick:
        budget = min(budget, 0.3)

    print(f"fastdl {fastdl.__version__} ({_commit()}), torch {torch.__version__}, "
          f"numpy {importlib.import_module('numpy').__version__}, device {device}, "
          f"cpu path {fastdl.build_info()['cpu_capability']}, threads fastdl "
          f"{fastdl.get_num_threads()} / torch {torch.get_num_threads()}", flush=True)
    limits = machine.limits(device)
    limits_start = dict(limits)
    cases = []
    for name in args.suite or SUITES:
        mod = importlib.import_module(f".{name}", __package__)
        cases += mod.cases(device=device, quick=args.quick)
    harness.run_cases(cases, budget_s=budget, progress=not args.no_progress)
    if device == "cpu":
        # This machine's bandwidth moves with its neighbours: measure again after the cases and
        # keep the better reading, so a fraction never flatters a run by a low limit.
        machine.cpu_limits.cache_clear()
        after = machine.limits(device)
        limits = {k: (max(v, after[k]) if isinstance(v, float) else v) for k, v in limits.items()}
        limits["bandwidth_GBps_start_end"] = (limits_start["bandwidth_GBps"],
                                              after["bandwidth_GBps"])
    rows = [harness.summarize(c, limits) for c in cases]
    print(harness.format_table(rows, limits))
    if args.json:
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                "commit": _commit(), "fastdl": fastdl.__version__, "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(), "device": device,
                "build_info": fastdl.build_info(), "limits": limits}
        if device == "cuda":
            meta["gpu"] = torch.cuda.get_device_name()
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0
