#!/usr/bin/env bash
# Builds fastdl with the emulated CUDA back end (FASTDL_CUDA_EMULATION=ON: csrc/cuda/*.cu compiled by
# the host compiler against csrc/cuda/emulation/) and runs the test suite against it. Every CUDA
# test then runs: the 'cuda' cases of the device fixture and the cuda_device tests pass CPU tensors
# through the CUDA path (Python front end, binding, emulated kernel) and compare with torch.
# Usage: .ci/emulation.sh [asan] [pytest args...]
#   asan: build with AddressSanitizer (CPU kernels and emulated CUDA kernels alike); torch is not
#   instrumented, so libasan and libstdc++ are preloaded (exceptions thrown inside torch then pass
#   ASan's __cxa_throw interceptor). Some files and tests stay out of that pass (listed below with
#   their reasons and measured costs); one of them checks a subprocess's stderr, which the
#   preloaded runtime changes.
# Run by .ci/run inside its venv; the work directory is FASTDL_CI_DIR (default /tmp/fastdl-ci).
set -euo pipefail
cd "$(dirname "$0")/.."
asan=0
if [[ "${1:-}" == asan ]]; then asan=1; shift; fi
work="${FASTDL_CI_DIR:-/tmp/fastdl-ci}/emulation$([[ $asan == 1 ]] && echo -asan || true)"
rm -rf "$work" && mkdir -p "$work/pkg"
pip install -q cmake ninja pybind11 "pytest-xdist==3.8.0"
flags=(-DFASTDL_CUDA=OFF -DFASTDL_CUDA_EMULATION=ON
       -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')")
env=(FASTDL_TEST_SEED="${FASTDL_TEST_SEED:-0}")
# CI time: the tests run on pytest-xdist workers, one per CPU up to 2 (each test's seed comes from
# its id, tests/conftest.py, so the draws do not depend on which worker runs it), with OpenMP's
# and fastdl's thread teams waiting passively (OMP_WAIT_POLICY=passive: parallel.h's barrier
# follows it), since each worker's teams already use every CPU and a spinning waiter would hold a
# core another worker needs (timings, with and without: benchmarks/RESULTS.md, section 2026-12-06
# 05:36; more workers were not measured). The barrier's spin paths keep their own test:
# tests/test_parallel.py sets each variant's policy.
workers=$(nproc)
((workers <= 2)) || workers=2
env+=(OMP_WAIT_POLICY=passive)
extra=()
# Without asan, .ci/run gives this pass -m cuda: the CUDA tests, which reach the CPU kernels only
# through their portable build. The AVX2 and AVX-512 builds are left out (the README suite and the
# ASan pass run them), which also compiles the portable-only configuration other CPUs get;
# build_info()['x86_kernel_builds'] says so, and the CPU-path tests expect 'default' then.
[[ $asan == 1 ]] || flags+=(-DFASTDL_X86_KERNEL_BUILDS=OFF)
if [[ $asan == 1 ]]; then
  # -g1 (line tables: ASan's reports keep file:line) rather than RelWithDebInfo's -g, which made
  # this build, CI's longest, compile ~1.2x slower (benchmarks/RESULTS.md, 2026-12-03 18:32).
  flags+=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG"
          -DCMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer"
          -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address")
  env+=(LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
        ASAN_OPTIONS=detect_leaks=0)
  extra+=(--deselect tests/test_build.py::test_env_var_rejects_unknown_path)
  # CI time (keep .ci/run under 30 min): files that reach no native code, or none beyond what
  # the kernels' own test files run, stay out of the ASan pass (they run uninstrumented in
  # .ci/run's README suite, and their 'cuda' cases in the emulation pass): metrics and
  # preprocessing are pure Python (no _C call); callbacks, the README and the examples train
  # through Linear/conv/pool/rnn/optimizer kernels that test_linear, test_conv*, test_pool,
  # test_rnn, test_optim run under ASan; the wheel tests build their own uninstrumented wheels;
  # the gpu_check.sh test reads a shell script; test_compile's kernels are the ones the kernel
  # files run, through torch.library ops whose front ends it checks bitwise against the eager
  # path (its inductor compiles are slow under ASan). test_bench stays: it is the only
  # caller of the stream-bandwidth kernel.
  for f in test_metrics test_preprocessing test_callbacks test_readme test_examples test_wheel \
           test_gpu_check_script test_compile; do
    extra+=(--ignore "tests/$f.py")
  done
  # Deselected, the two slowest CPU-bound items under ASan (they run uninstrumented in the README
  # suite, and other cases under ASan run the same kernels): conv's gradcheck/gradgradcheck
  # (Python autograd over kernels the sweeps run) and test_bench's tiny --report run (every
  # suite's kernels through the harness, which the kernel tests run under ASan). Every emulated
  # CUDA case runs here but one, and the whole-model, torch.func and 2-process DDP files: the
  # costs are in benchmarks/RESULTS.md (2026-12-03 18:32). The one: the implicit GEMM's
  # one-launch-per-phase fallback past grid.z (65540 blocks of 256 emulated threads, 13 s in the
  # emulation pass, which runs it; the same kernels as every other input-gradient case).
  # Two more emulated CUDA cases, the slowest under ASan (a quarter of the pass's test time on the
  # AMD Zen 3 VM, when CI neared its limit: RESULTS.md, 2026-12-05 13:59): the depthwise weight
  # gradient's chunked, deterministic sums over 5 x 256 planes, and 65536-group layers past the
  # implicit GEMM's grid limits (its errors, then the depthwise kernels over them). Both run in
  # the emulation pass; their kernels' other cases run here.
  for t in test_conv.py::test_gradcheck test_conv.py::test_gradgradcheck \
           "test_bench.py::test_report_from_a_tiny_run" \
           test_conv.py::test_conv2d_cuda_gemm_phases_past_grid_z \
           test_conv.py::test_conv2d_cuda_depthwise_weight_grad_chunks_deterministic \
           test_conv.py::test_conv_cuda_grid_limits; do
    extra+=(--deselect "tests/$t")
  done
fi
cmake -S . -B "$work/build" -G Ninja "${flags[@]}" >/dev/null
cmake --build "$work/build" >/dev/null
echo "built $work/build in $SECONDS s"
cp -r python/fastdl "$work/pkg/" && rm -f "$work"/pkg/fastdl/_C*.so && cp "$work"/build/_C*.so "$work/pkg/fastdl/"
env "${env[@]}" PYTHONPATH="$work/pkg" python -c \
  "import fastdl, sys; i = fastdl.build_info(); print('build_info:', i); sys.exit(0 if i['cuda_emulation'] else 'not an emulation build')"
# A --deselect that matches no test id deselects nothing, silently: say so loudly (a warning, not
# a failure: a pytest release that renames ids must not block CI; the pass then runs those tests).
# The ids are collected with the run's own --ignore list and the venv's pytest.
deselected=() collect=()
for ((i = 0; i < ${#extra[@]}; i += 2)); do
  if [[ "${extra[i]}" == --deselect ]]; then deselected+=("${extra[i + 1]}")
  else collect+=("${extra[i]}" "${extra[i + 1]}"); fi
done
if ((${#deselected[@]})); then
  ids=$(env "${env[@]}" PYTHONPATH="$work/pkg" python -m pytest --collect-only -q -p no:cacheprovider \
        tests "${collect[@]}" 2>&1) || { printf '%s\n' "$ids" >&2; echo "collecting the tests failed" >&2; exit 1; }
  for t in "${deselected[@]}"; do   # pytest's rule: a node id prefix
    [[ $'\n'$ids == *$'\n'"$t"* ]] || echo "WARNING: stale --deselect (matches no test id; it runs): $t" >&2
  done
fi
env "${env[@]}" PYTHONPATH="$work/pkg" python -m pytest -q -p no:cacheprovider -n "$workers" tests \
  "${extra[@]}" "$@"
