"""Training epochs of the worked examples' models (digits CNN, membrane LSTM), fastdl's layers and
optimizer against torch's.

    python benchmarks/bench_train.py [--device cuda] [--json out.json] [--quick]
Same suite as `fastdl-bench --suite train` (python/fastdl/bench/train.py).
"""
import sys

from fastdl.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "train"] + sys.argv[1:]))
