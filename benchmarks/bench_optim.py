"""Optimizer steps, fastdl against torch.optim (foreach=False, foreach=True, fused=True).

    python benchmarks/bench_optim.py [--device cuda] [--json out.json]
Same suite as `fastdl-bench --suite optim` (python/fastdl/bench/optim.py).
"""
import sys

from fastdl.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "optim"] + sys.argv[1:]))
