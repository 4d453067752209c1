"""fastdl-bench: every benchmark suite on one device against torch, one table at the end.

    fastdl-bench                          # all suites on the CPU
    fastdl-bench --quick                  # smaller, shorter cases (under 2 minutes on 2 cores)
    fastdl-bench --device cuda            # the same on the GPU
    fastdl-bench --suite optim,pool --json results.json
    fastdl-bench --report DIR             # JSON, Markdown table, PNG charts (fastdl[report])
    fastdl-bench --compare A.json B.json  # per-op change between two runs; exit 1 on a regression
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import subprocess
import sys

# Suite name -> module fastdl.bench.<name> exposing cases(device, quick). A new kernel family
# adds its name here; the table, the JSON, the report and --compare pick it up unchanged.
SUITES = ["optim", "gemm", "pool", "conv", "rnn", "train", "models", "overhead"]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _suites(ap: argparse.ArgumentParser, values) -> list:
    """--suite a,b --suite c -> [a, b, c] in SUITES order; an unknown name is a usage error."""
    if not values:
        return list(SUITES)
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        ap.error(f"unknown suite {', '.join(repr(n) for n in unknown)} "
                 f"(known: {', '.join(SUITES)})")
    return [s for s in SUITES if s in names]


def run(device: str, suites: list, *, quick=False, budget=None, min_reps=7, progress=True):
    """Measures the limits, runs the suites with torch on fastdl's thread count, re-measures the
    limits, and returns {"meta": ..., "rows": [...]}, the document --json and --report write."""
    import numpy
    import torch

    import fastdl
    from . import harness, machine

    budget = budget if budget is not None else (1.0 if device == "cuda" else 2.0)
    if quick:
        budget = min(budget, 0.3)
        min_reps = min(min_reps, 5)
    threads = fastdl.get_num_threads()
    torch_threads = torch.get_num_threads()
    # numpy's BLAS (the gemm suite's third side) on fastdl's count; None: threadpoolctl missing,
    # and the gemm rows say so. Its restore also resets the OpenMP count it saw when limiting, so
    # it is limited before torch's count is set and restored before torch's is.
    from .gemm import limit_blas_threads
    blas = limit_blas_threads(threads)
    # Same threads on both sides. torch shares libgomp with fastdl, but fastdl opens its regions
    # with its own count, so setting torch's does not change fastdl's.
    torch.set_num_threads(threads)
    torch_threads_during = torch.get_num_threads()
    try:
        print(f"fastdl {fastdl.__version__} ({_commit()}), torch {torch.__version__}, numpy "
              f"{numpy.__version__}, device {device}, cpu path {_cpu_paths()}, threads fastdl "
              f"{threads} / torch "
              f"{torch.get_num_threads()} (was {torch_threads})", flush=True)
        limits = machine.limits(device, quick)
        cases = []
        for name in suites:
            mod = importlib.import_module(f".{name}", __package__)
            cases += mod.cases(device=device, quick=quick)
        interrupted = False
        try:
            harness.run_cases(cases, budget_s=budget, min_reps=min_reps, progress=progress,
                              quick=quick)
        except KeyboardInterrupt:
            # Ctrl-C, or a time limit's SIGINT (benchmarks/gpu_check.sh): keep the cases measured
            # so far, so the table and --json still carry them (meta "interrupted": true).
            interrupted = True
            cases = [c for c in cases if c.results]
        if device == "cpu" and not interrupted:
            # This machine's bandwidth moves with its neighbours: measure again after the cases
            # and keep the better reading, so a fraction never flatters a run by a low limit.
            machine.cpu_limits.cache_clear()
            limits = machine.merge(limits, machine.limits(device, quick))
        rows = [harness.summarize(c, limits) for c in cases]
    finally:
        if blas is not None:
            blas.restore_original_limits()
        torch.set_num_threads(torch_threads)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(), "fastdl": fastdl.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "machine": _cpu_name(), "device": device, "threads": threads, "quick": quick,
            "torch_threads": {"before": torch_threads, "during": torch_threads_during},
            "numpy_blas_threads": threads if blas is not None else "BLAS default",
            "suites": suites, "build_info": fastdl.build_info(), "limits": limits,
            "interrupted": interrupted}
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    return {"meta": meta, "rows": rows}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_paths():
    """The CPU kernel build: one name, or the base and the families on another ("avx2;
    avx512 for gemm, recurrent_forward, optim")."""
    import fastdl

    info = fastdl.build_info()
    base = info["cpu_capability"]
    other = {}
    for family, path in info["cpu_capability_by_kernel"].items():
        if path != base:
            other.setdefault(path, []).append(family)
    return "; ".join([base] + [f"{p} for {', '.join(fs)}" for p, fs in other.items()])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastdl-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="device to benchmark (default: cpu)")
    ap.add_argument("--suite", action="append", metavar="A,B",
                    help=f"run only these suites, comma-separated ({', '.join(SUITES)}; "
                         "default: all)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw figures to PATH")
    ap.add_argument("--report", metavar="DIR",
                    help="write results.json, report.md and one PNG chart per suite to DIR")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                    help="print the per-op change from run A to run B (no benchmarking)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="--compare: relative change counted as a regression (default: twice "
                         "the spread limit, 0.5)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of measurement per case (default 2 on cpu, 1 on cuda)")
    ap.add_argument("--min-reps", type=int, default=7, help="fewest repetitions per case")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter cases (a smoke run)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    if args.compare:
        from . import compare
        return compare.main(*args.compare, threshold=compare.DEFAULT_THRESHOLD
                            if args.threshold is None else args.threshold)
    suites = _suites(ap, args.suite)
    if args.report:
        from . import report
        report.check_available()   # before minutes of measuring, not after

    import torch

    import fastdl
    from . import harness

    device = args.device or "cpu"
    if device == "cuda" and not (fastdl.cuda.is_available() and torch.cuda.is_available()):
        print("fastdl-bench: --device cuda needs a CUDA build of fastdl and a visible GPU "
              f"(fastdl.cuda.is_available()={fastdl.cuda.is_available()}, "
              f"torch.cuda.is_available()={torch.cuda.is_available()})", file=sys.stderr)
        return 2
    doc = run(device, suites, quick=args.quick, budget=args.budget, min_reps=args.min_reps,
              progress=not args.no_progress)
    print(harness.format_table(doc["rows"], doc["meta"]["limits"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.report:
        for path in report.write(doc, args.report):
            print(f"wrote {path}")
    if doc["meta"]["interrupted"]:
        print(f"fastdl-bench: interrupted; {len(doc['rows'])} measured case(s) kept above",
              file=sys.stderr)
        return 130
    return 0
