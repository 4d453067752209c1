"""fastdl-bench: fastdl's kernels against the PyTorch built-ins, side by side in one process.

Run ``fastdl-bench`` (or ``python -m fastdl.bench``); ``--help`` lists the options. Each suite
lives in its own module here (``optim.py`` ...) and is also run by ``benchmarks/bench_<op>.py``.
"""
from .harness import Case, run_cases  # noqa: F401
