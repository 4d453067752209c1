"""Convolution (issue #8's seven shapes), forward and forward+backward, fastdl against torch.

    python benchmarks/bench_conv.py [--device cuda] [--json out.json] [--quick]
Same suite as `fastdl-bench --suite conv` (python/fastdl/bench/conv.py).
"""
import sys

from fastdl.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "conv"] + sys.argv[1:]))
