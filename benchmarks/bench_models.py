"""One training step of well-known torch models (ResNet-18, the word-level LSTM LM) converted by
fastdl.nn.convert with fastdl.optim, against the unconverted model with torch.optim.

    python benchmarks/bench_models.py [--device cuda] [--json out.json] [--quick]
Same suite as `fastdl-bench --suite models` (python/fastdl/bench/models.py).
"""
import sys

from fastdl.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "models"] + sys.argv[1:]))
