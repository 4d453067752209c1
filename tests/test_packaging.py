"""packaging/check_cuda_archs.sh, the CUDA wheel's architecture check that build_wheel.sh runs
(issue #12): a cubin for every architecture of the CMake list, PTX for every one not marked
-real, and a failure (never a pass) when cuobjdump is missing. cuobjdump is faked here: it prints
the listings a real one gives for the module. Also packaging/smoke_test.py's main() run in-process
against the in-tree build, so a public op without a smoke entry fails the fast suite."""
import importlib.util
import os
import subprocess

import pytest

import fastdl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "packaging", "check_cuda_archs.sh")
DEFAULT = ["75", "80", "86", "89", "90"]


def _fake_cuobjdump(tmp_path, cubins, ptx):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    elf = "".join(f"ELF file    {i + 1}: _C.{i + 1}.sm_{a}.cubin\\n" for i, a in enumerate(cubins))
    pt = "".join(f"PTX file    {i + 1}: _C.{i + 1}.sm_{a}.ptx\\n" for i, a in enumerate(ptx))
    tool = bin_dir / "cuobjdump"
    tool.write_text("#!/bin/bash\n"
                    f'case "$1" in --list-elf) printf "{elf}" ;; --list-ptx) printf "{pt}" ;; '
                    "*) exit 2 ;; esac\n")
    tool.chmod(0o755)
    return str(bin_dir)


def _check(tmp_path, path_dirs, *args, cmake_args=None):
    so = tmp_path / "_C.so"
    so.write_bytes(b"\x7fELF")
    env = {k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}
    env["PATH"] = os.pathsep.join(path_dirs + ["/usr/bin", "/bin"])
    if cmake_args is not None:
        env["CMAKE_ARGS"] = cmake_args
    return subprocess.run(["bash", SCRIPT, str(so), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_default_list_passes_when_every_architecture_is_there(tmp_path):
    r = _check(tmp_path, [_fake_cuobjdump(tmp_path, DEFAULT, ["90"])])
    assert r.returncode == 0, r.stderr
    assert "CUDA architectures OK: 75-real;80-real;86-real;89-real;90" in r.stdout


@pytest.mark.parametrize("cubins,ptx,missing", [
    (["75", "80", "86", "90"], ["90"], "sm_89 machine code"),   # an architecture dropped
    (DEFAULT, [], "sm_90 PTX"),                                   # no PTX for newer GPUs
])
def test_a_missing_architecture_fails(tmp_path, cubins, ptx, missing):
    r = _check(tmp_path, [_fake_cuobjdump(tmp_path, cubins, ptx)])
    assert r.returncode == 1 and missing in r.stderr, (r.stdout, r.stderr)


def test_the_list_comes_from_cmake_args(tmp_path):
    tool = _fake_cuobjdump(tmp_path, ["90"], [])
    ok = _check(tmp_path, [tool], cmake_args="-DFOO=1 -DCMAKE_CUDA_ARCHITECTURES=90-real")
    assert ok.returncode == 0, ok.stderr
    bad = _check(tmp_path, [tool], cmake_args='-DCMAKE_CUDA_ARCHITECTURES:STRING="80-real;90"')
    assert bad.returncode == 1 and "sm_80 machine code" in bad.stderr and "sm_90 PTX" in bad.stderr


def test_missing_cuobjdump_fails(tmp_path):
    if any(os.access(os.path.join(d, "cuobjdump"), os.X_OK) for d in ("/usr/bin", "/bin")):
        pytest.skip("a real cuobjdump in /usr/bin or /bin cannot be hidden from the check")
    r = _check(tmp_path, [])
    assert r.returncode == 1 and "cuobjdump not found" in r.stderr


def test_build_wheel_runs_the_check_and_stops_on_a_failed_listing():
    text = open(os.path.join(ROOT, "packaging", "build_wheel.sh")).read()
    assert "bash packaging/check_cuda_archs.sh" in text
    assert 'listing=$("$PYTHON" -m zipfile -l "$whl")' in text
    assert "python -m" not in text.replace('"$PYTHON" -m', "")   # one interpreter throughout


def _smoke_module():
    spec = importlib.util.spec_from_file_location(
        "fastdl_smoke_test", os.path.join(ROOT, "packaging", "smoke_test.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_test_covers_and_passes_every_public_op(capsys):
    smoke = _smoke_module()
    algo = fastdl.ops.get_conv_algorithm()
    assert smoke.main([]) == 0
    assert fastdl.ops.get_conv_algorithm() == algo       # the smoke run leaves no global state
    assert f"smoke: {len(smoke.public_names())} public ops OK" in capsys.readouterr().out


def test_smoke_test_fails_for_a_public_op_without_an_entry(monkeypatch):
    smoke = _smoke_module()
    monkeypatch.delitem(smoke.SMOKE, "ops.conv2d")
    with pytest.raises(SystemExit, match=r"no smoke call for \['ops.conv2d'\]"):
        smoke.main([])
