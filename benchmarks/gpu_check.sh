#!/usr/bin/env bash
# One prepared command for a machine with an NVIDIA GPU and no network (Python, torch with CUDA,
# nvcc, pybind11, scikit-build-core, cmake and ninja already installed). Builds fastdl for the
# local GPU, runs the CUDA tests, runs fastdl-bench --device cuda, and prints a short table last.
# Whole run: under 8 minutes. Outputs land in ${OUT:-/tmp/fastdl-gpu} (logs, bench JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastdl-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')

echo "== build for sm_${cap} =="
export CMAKE_ARGS="-DFASTDL_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${cap}"
if ! python -m pip install --no-build-isolation --no-deps -q . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
python -c "import fastdl; print(fastdl.build_info())" | tee "$OUT/build_info.txt"

echo "== CUDA tests =="
timeout 300 python -m pytest -q -x -k cuda tests 2>&1 | tee "$OUT/tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}

echo "== fastdl-bench --device cuda =="
timeout 240 fastdl-bench --device cuda --no-progress --json "$OUT/bench_cuda.json" \
  2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== summary =="
python - "$OUT/bench_cuda.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print("no benchmark figures:", e); sys.exit(0)
m = d["meta"]
print(f"{m.get('gpu')}  copy bandwidth {m['limits']['bandwidth_GBps']:.0f} GB/s  commit {m['commit']}")
for r in d["rows"]:
    best = max(r["speedup"].items(), key=lambda kv: -kv[1]) if r["speedup"] else ("", 0)
    f = r.get("frac", {}).get("fastdl")
    frac = "" if f is None else ("LIMIT ERROR" if r.get("limit_error") else f"{100 * f:.0f}% {r['limit']['tier']}")
    sp = " ".join(f"{k.replace('torch ', '')}={v:.2f}x" for k, v in r["speedup"].items())
    print(f"{r['suite']:<6} {r['case']:<36} {r['fastdl_ms']:>9.3f} ms  {sp:<48} {frac}")
PY
echo "tests rc=${tests_rc} bench rc=${bench_rc}"
