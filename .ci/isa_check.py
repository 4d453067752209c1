"""Checks a built fastdl._C (with its symbol table: a RelWithDebInfo or ASan build, not the
stripped release one) for instructions outside the kernel build that may run them: the portable
code must run on any x86-64 CPU and the AVX2 build on CPUs without AVX-512 (e.g. Zen 3). A header
function compiled into several kernel builds and emitted out of line (a weak or global symbol)
would be merged by the linker into one copy, possibly the AVX-512 one, which the other builds
would then call. Local symbols (a TU's own clones, e.g. std::vector's [clone .constprop.0]) are
called only from their own TU, which runs only under its build's dispatch: not flagged.
Usage: python .ci/isa_check.py path/to/_C*.so   (exit 1 listing the offending functions)"""
import os
import re
import subprocess
import sys

EVEX = re.compile(r"%zmm|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[0-7]\b|\{1to\d+\}")
VEX = re.compile(r"^\s*[0-9a-f]+:\s+v[a-z]")  # a VEX or EVEX mnemonic (AVX and later): vaddps, ...


def main(path):
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", path], check=True,
                          capture_output=True, text=True).stdout
    local = set()
    for line in subprocess.run(["nm", path], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "t":
            local.add(int(parts[0], 16))
    func, bad, seen = None, {}, 0
    for line in text.splitlines():
        m = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if m:
            func = None if int(m.group(1), 16) in local else m.group(2)
            seen += 1
            continue
        if func is None or "\t" not in line:
            continue
        if EVEX.search(line) and "isa_avx512" not in func:
            bad.setdefault(func, line.strip())
        elif VEX.search(line) and "isa_avx2" not in func and "isa_avx512" not in func:
            bad.setdefault(func, line.strip())
    if seen < int(os.environ.get("ISA_CHECK_MIN_FUNCS", 100)):
        sys.exit(f"isa_check: only {seen} functions in {path}: stripped? (needs a symbol table)")
    for f, ins in sorted(bad.items()):
        print(f"isa_check: {f[:160]}\n    {ins}")
    print(f"isa_check: {seen} functions, {len(bad)} with instructions beyond their build's ISA")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
