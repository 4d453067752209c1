"""Recurrent layers: fastdl.nn.RNN / LSTM / GRU and the cells against the torch modules, float32,
forward alone and forward + backward.

    python benchmarks/bench_rnn.py [--device cuda] [--json out.json]
Same suite as `fastdl-bench --suite rnn` (python/fastdl/bench/rnn.py).
"""
import sys

from fastdl.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "rnn"] + sys.argv[1:]))
