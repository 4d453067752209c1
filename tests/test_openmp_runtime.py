"""One OpenMP runtime per process (python/fastdl/_openmp.py): fastdl and torch share a single
libgomp in either import order, and without a system libgomp fastdl loads torch's copy without
importing torch (issue #12: wheels exclude libgomp instead of bundling a second pool)."""
import os
import subprocess
import sys

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

MAPS = ("sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l})")


def run_py(code):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


def test_one_libgomp_in_either_import_order():
    for first, second in (("fastdl", "torch"), ("torch", "fastdl")):
        out = run_py(f"import {first}, {second}; print(len({MAPS}))")
        assert out == ["1"], (first, second, out)


def test_falls_back_to_torchs_libgomp_without_importing_torch():
    # Simulate a system without libgomp: the bare soname lookup fails.
    code = ("import ctypes, sys\n"
            "real = ctypes.CDLL\n"
            "def cdll(name, *a, **k):\n"
            "    if name == 'libgomp.so.1': raise OSError('no system libgomp')\n"
            "    return real(name, *a, **k)\n"
            "ctypes.CDLL = cdll\n"
            "import fastdl\n"
            "print('torch' in sys.modules)\n"
            f"print({MAPS})\n")
    imported_torch, maps = run_py(code)
    assert imported_torch == "False"
    assert "torch/lib/libgomp" in maps and maps.count("libgomp") == 1, maps
