#!/usr/bin/env bash
# The test suite against an AddressSanitizer build of the CPU kernels and the emulated CUDA kernels
# (the emulation build, .ci/emulation.sh asan): an out-of-bounds read or write, or a use-after-free,
# anywhere a test reaches, CPU or CUDA code, fails CI. Emulated shared memory is fenced by poisoned
# bytes, and the fiber switches are announced to ASan (csrc/cuda/emulation/emu_runtime.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/emulation.sh asan "$@"
