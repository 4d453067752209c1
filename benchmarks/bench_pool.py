"""Pooling (max, avg, global avg), forward and forward+backward, fastdl against torch.

    python benchmarks/bench_pool.py [--device cuda] [--json out.json] [--quick]
Same suite as `fastdl-bench --suite pool` (python/fastdl/bench/pool.py).
"""
import sys

from fastdl.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "pool"] + sys.argv[1:]))
