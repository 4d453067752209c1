#!/usr/bin/env bash
# The test suite against an AddressSanitizer build of the CPU kernels: an out-of-bounds read or
# write, or a use-after-free, anywhere a test reaches fails CI. Run by .ci/run inside its venv.
# torch is not instrumented; libstdc++ is preloaded beside libasan so exceptions thrown inside torch
# pass ASan's __cxa_throw interceptor. One test is deselected: it checks a subprocess's stderr,
# which the preloaded runtime changes.
set -euo pipefail
cd "$(dirname "$0")/.."
work=/tmp/fastdl-ci-asan
rm -rf "$work" && mkdir -p "$work/pkg"
pip install -q cmake ninja pybind11
cmake -S . -B "$work/build" -G Ninja -DFASTDL_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer" \
      -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address" \
      -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$work/build" >/dev/null
cp -r python/fastdl "$work/pkg/" && rm -f "$work"/pkg/fastdl/_C*.so && cp "$work"/build/_C*.so "$work/pkg/fastdl/"
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \
ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$work/pkg" \
  python -m pytest -q -p no:cacheprovider tests \
  --deselect tests/test_build.py::test_env_var_rejects_unknown_path
