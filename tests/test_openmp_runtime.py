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


def test_prefers_torchs_libgomp_over_the_systems_when_fastdl_comes_first():
    # torch, imported later, then binds to the runtime its wheel ships, not an older system one.
    (maps,) = run_py(f"import fastdl; print({MAPS})")
    assert "torch/lib/libgomp.so.1" in maps and maps.count("libgomp") == 1, maps


def _renamed_libgomp(directory, name):
    """A copy of the system's libgomp at directory/name with its own soname (name), as the
    renamed private copies of older torch wheels and of other packages' wheels are."""
    import ctypes
    directory.mkdir(parents=True, exist_ok=True)
    real = ctypes.CDLL("libgomp.so.1")
    src = next(l.split()[-1] for l in open("/proc/self/maps") if "libgomp" in l)
    del real
    renamed = directory / name
    renamed.write_bytes(open(src, "rb").read())
    subprocess.run(["patchelf", "--set-soname", renamed.name, str(renamed)], check=False,
                   capture_output=True)
    return renamed


def _fake_torch_with_renamed_libgomp(tmp_path):
    """A package `torch` whose lib/ holds only a renamed copy (libgomp-<hash>.so.1, own soname),
    as torch wheels before libgomp.so.1 was shipped under its name did."""
    renamed = _renamed_libgomp(tmp_path / "torch" / "lib", "libgomp-a34b3233.so.1")
    (tmp_path / "torch" / "__init__.py").write_text("")
    return renamed


def _run_with(tmp_path, code):
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


WARN = ("import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastdl\n"
        "print([str(x.message) for x in w if issubclass(x.category, RuntimeWarning)])\n")


def test_a_renamed_libgomp_already_loaded_is_not_taken_for_libgomp_so_1(tmp_path):
    renamed = _fake_torch_with_renamed_libgomp(tmp_path)
    # "torch imported first": only its renamed copy is in the process.
    out = _run_with(tmp_path, f"import ctypes; ctypes.CDLL({str(renamed)!r})\n" + WARN)
    assert "libgomp-a34b3233.so.1" in out[0] and "second thread pool" in out[0], out


def test_a_renamed_libgomp_in_torch_lib_is_warned_about(tmp_path):
    _fake_torch_with_renamed_libgomp(tmp_path)
    out = _run_with(tmp_path, WARN + f"print({MAPS})")
    assert "libgomp-a34b3233.so.1" in out[0], out
    assert "libgomp.so.1" in out[1], out      # fastdl still loads (the system's copy)


def test_no_warning_with_torchs_libgomp_so_1():
    assert run_py(WARN) == ["[]"]


def test_another_packages_renamed_libgomp_is_not_blamed_on_torch(tmp_path):
    """scikit-learn's wheel vendors libgomp-<hash>.so.1: imported before fastdl it is in the
    process, and fastdl warned that torch ships a renamed runtime. It serves that package alone;
    fastdl and torch still share torch's libgomp.so.1, so there is nothing to warn about."""
    vendored = _renamed_libgomp(tmp_path / "other_pkg.libs", "libgomp-e985bcbb.so.1.0.0")
    out = run_py(f"import ctypes; ctypes.CDLL({str(vendored)!r})\n" + WARN + f"print({MAPS})")
    assert out[0] == "[]", out
    assert "torch/lib/libgomp.so.1" in out[1], out


def test_a_renamed_libgomp_in_torch_libs_is_warned_about(tmp_path):
    """auditwheel-repaired torch wheels (aarch64) keep their renamed runtime in torch.libs/ beside
    torch/: that copy, loaded first, is torch's, and two pools run."""
    (tmp_path / "torch" / "lib").mkdir(parents=True)
    (tmp_path / "torch" / "__init__.py").write_text("")
    renamed = _renamed_libgomp(tmp_path / "torch.libs", "libgomp-947d5fa1.so.1.0.0")
    out = _run_with(tmp_path, f"import ctypes; ctypes.CDLL({str(renamed)!r})\n" + WARN)
    assert "libgomp-947d5fa1.so.1.0.0" in out[0] and "second thread pool" in out[0], out
