"""Matrix multiply, fastdl's GEMM against torch.matmul and numpy's matmul (OpenBLAS), float32.

    python benchmarks/bench_gemm.py [--device cuda] [--json out.json]
Same suite as `fastdl-bench --suite gemm` (python/fastdl/bench/gemm.py). To compare against
OpenBLAS as numpy ships it, run without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE in the environment.
"""
import sys

from fastdl.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "gemm"] + sys.argv[1:]))
