#!/usr/bin/env bash
# Checks that a CUDA build of fastdl._C holds machine code (a cubin) for every architecture of its
# CMake CUDA architecture list and PTX for every one not marked -real, then lists what it holds.
#
#   packaging/check_cuda_archs.sh path/to/_C.so ["75-real;80-real;90"]
#
# Without the list: the -DCMAKE_CUDA_ARCHITECTURES=... in $CMAKE_ARGS (what build_wheel.sh
# passes on), else CMakeLists.txt's default. Needs cuobjdump (CUDA toolkit, or pip's
# nvidia-cuda-cuobjdump) on the PATH: without it the check fails rather than passing unchecked.
set -euo pipefail
so=${1:?usage: $0 _C.so [ARCH_LIST]}
archs=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$archs" ]; then
  archs=$(printf '%s\n' "${CMAKE_ARGS:-}" | tr ' ' '\n' |
          sed -n 's/^-DCMAKE_CUDA_ARCHITECTURES\(:STRING\)\{0,1\}=//p' | tail -1 | tr -d "\"'")
fi
if [ -z "$archs" ]; then
  archs=$(sed -n 's/.*set(CMAKE_CUDA_ARCHITECTURES "\([^"]*\)").*/\1/p' "$root/CMakeLists.txt")
fi
[ -n "$archs" ] || { echo "error: no CUDA architecture list to check against" >&2; exit 1; }
command -v cuobjdump >/dev/null ||
  { echo "error: cuobjdump not found: cannot check the CUDA architectures of $so" >&2; exit 1; }
[ -f "$so" ] || { echo "error: $so not found" >&2; exit 1; }

# A build without any PTX (all -real) makes --list-ptx report nothing; a missing cubin or PTX
# that the list asks for fails below either way, so only the listings are used.
elf=$(cuobjdump --list-elf "$so" 2>&1) || true
ptx=$(cuobjdump --list-ptx "$so" 2>&1) || true
missing=()
for a in $(printf '%s' "$archs" | tr ';,' '  '); do
  num=${a%%-*}
  case "$num" in
    all|all-major|native|*[!0-9a-z]*)
      echo "error: architecture '$a' cannot be checked: give explicit numbers" >&2; exit 1 ;;
  esac
  if [ "$a" != "$num-virtual" ] && ! grep -q "\.sm_$num\.cubin" <<<"$elf"; then
    missing+=("sm_$num machine code")
  fi
  if [ "$a" != "$num-real" ] && ! grep -q "\.sm_$num\.ptx" <<<"$ptx"; then
    missing+=("sm_$num PTX")
  fi
done
# One cubin per .cu file and architecture; PTX only where the list asks (forward compatibility).
grep -o 'sm_[0-9a-z]*\.cubin' <<<"$elf" | sed 's/\.cubin//' | sort | uniq -c || true
grep -o 'sm_[0-9a-z]*\.ptx' <<<"$ptx" | sed 's/\.ptx//; s/^/ptx /' | sort | uniq -c || true
if [ ${#missing[@]} -gt 0 ]; then
  echo "error: $so lacks ${missing[*]} (architectures: $archs)" >&2
  exit 1
fi
echo "CUDA architectures OK: $archs"
