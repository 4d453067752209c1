"""The build and runtime surface: import without a GPU, build_info, CPU path selection, threads,
and that numpy users never import torch."""
import ast
import os
import subprocess
import sys

import numpy as np
import pytest

import fastdl
from fastdl import _C

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def run_py(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**ENV, **env}, timeout=120)


_FAMILIES = ("conv", "pool", "gemm", "recurrent_forward", "recurrent_backward", "optim")
# On AMD Zen 4 (family 25 with AVX-512) and mobile Zen 5 (family 26, 256-bit units): the families
# measured faster on the AVX-512 build on Zen 4.
_AMD_AVX512_FAMILIES = {"gemm", "recurrent_forward", "optim"}


def _zen5_full_width(model: int) -> bool:
    """AMD family 26 (Zen 5) models with 512-bit units: server, desktop, Strix Halo."""
    return model <= 0x1F or 0x40 <= model <= 0x4F or 0x70 <= model <= 0x7F


def _zen5_mobile(model: int) -> bool:
    """AMD family 26 (Zen 5) models with 256-bit units: Strix Point, Krackan."""
    return 0x20 <= model <= 0x2F or 0x60 <= model <= 0x6F


def _expected_automatic_path(family=None):
    """The CPU path fastdl should pick with FASTDL_CPU_CAPABILITY unset, read from /proc/cpuinfo
    (not from fastdl's own detection): AVX-512 on Intel, else AVX2+FMA+F16C, else portable;
    family (one of _FAMILIES): on AMD family 26 (Zen 5) full-width models, AVX-512 for every
    family but pool, the base (family None) included; on AMD family 25 with AVX-512 (Zen 4) and
    the mobile family 26 models, AVX-512 for _AMD_AVX512_FAMILIES; other AMD models AVX2.
    The portable path in a build without the x86 kernel builds (FASTDL_X86_KERNEL_BUILDS=OFF, as
    in CI's emulation pass, or a non-x86 CPU); None where /proc/cpuinfo is missing."""
    if not _C.x86_kernel_builds():
        return "default"
    if not _C.cpu_supports_avx2() and not os.path.exists("/proc/cpuinfo"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    first = text.split("\n\n")[0]
    # ("flags\t\t: fpu ...": keys padded with tabs)
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines()
                                                if ":" in line)}
    flags = set(fields.get("flags", "").split())
    vendor = fields.get("vendor_id", "")
    if not flags:
        return None
    if {"avx2", "fma", "f16c"} <= flags:
        if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
            amd_family = fields.get("cpu family") if vendor == "AuthenticAMD" else None
            model = int(fields.get("model", "0"))
            if amd_family == "26" and _zen5_full_width(model):
                return "avx2" if family == "pool" else "avx512"
            split = amd_family == "25" or (amd_family == "26" and _zen5_mobile(model))
            if vendor == "GenuineIntel" or (split and family in _AMD_AVX512_FAMILIES):
                return "avx512"
        return "avx2"
    return "default"


def test_build_info_fields():
    info = fastdl.build_info()
    if not os.environ.get("FASTDL_CPU_CAPABILITY"):
        want = _expected_automatic_path()
        if want is not None:
            assert run_py("import fastdl; print(fastdl.build_info()['cpu_capability'])"
                          ).stdout.strip() == want
            by_kernel = run_py("import fastdl; print(fastdl.build_info()"
                               "['cpu_capability_by_kernel'])").stdout.strip()
            assert ast.literal_eval(by_kernel) == {f: _expected_automatic_path(f)
                                                   for f in _FAMILIES}
    assert set(info) >= {"version", "cpu_capability", "cuda_compiled", "cuda_architectures",
                         "num_threads", "x86_kernel_builds", "address_sanitizer"}
    assert info["cpu_capability"] in ("default", "avx2", "avx512")
    if info["cuda_compiled"]:
        assert info["cuda_architectures"], "a CUDA build lists its architectures"
    before = fastdl.get_num_threads()
    try:
        fastdl.set_num_threads(3)
        assert fastdl.build_info()["num_threads"] == 3
    finally:
        fastdl.set_num_threads(before)


def test_version_is_the_packages():
    """The version compiled into the module (CMake's FASTDL_VERSION) is pyproject.toml's, and an
    installed fastdl's metadata agrees with the module it installed."""
    import importlib.metadata
    import tomllib
    from pathlib import Path
    version = fastdl.build_info()["version"]
    assert version == fastdl.__version__
    checked = 0
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        want = tomllib.loads(pyproject.read_text())["project"]["version"]
        # CMake run by hand (the developer build) has no scikit-build-core version: "<v>.dev"
        assert version in (want, want + ".dev"), (version, want)
        checked += 1
    try:
        dist = importlib.metadata.distribution("fastdl")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None and Path(str(dist.locate_file("fastdl"))) == Path(fastdl.__file__).parent:
        assert version == dist.version, (version, dist.version)
        checked += 1
    if not checked:
        pytest.skip("needs pyproject.toml (source tree) or an installed fastdl distribution")


def test_cuda_reports_consistently():
    avail = fastdl.cuda.is_available()
    assert avail == (fastdl.cuda.device_count() > 0)
    if not fastdl.cuda.is_compiled():
        assert not avail
    if not avail:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            fastdl.cuda.get_device_name()


@pytest.mark.parametrize("path", ["default", "avx2", "avx512"])
def test_env_var_forces_cpu_path(path):
    if path == "avx2" and not _C.cpu_supports_avx2():
        pytest.skip("this CPU or build has no AVX2+FMA path")
    if path == "avx512" and not _C.cpu_supports_avx512():
        pytest.skip("this CPU or build has no AVX-512 path")
    r = run_py("import fastdl; i = fastdl.build_info(); print(i['cpu_capability'], "
               "sorted(set(i['cpu_capability_by_kernel'].values())))",
               FASTDL_CPU_CAPABILITY=path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{path} {[path]}"   # every family on it


def test_family_setting_reaches_its_kernels():
    """The convolution family's build decides its algorithm (2 images of 10x10 outputs over 32 ->
    64 channels: the channels-minor forward on the AVX-512 build, GEMM on the others), whatever
    the other families run."""
    from fastdl.ops import conv as ops_conv
    if not _C.cpu_supports_avx512():
        pytest.skip("this CPU or build has no AVX-512 path")
    x, w = np.zeros((2, 32, 12, 12), np.float32), np.zeros((64, 32, 3, 3), np.float32)
    try:
        _C.set_cpu_capability_for("conv", "avx512")
        for other in _FAMILIES:
            if other != "conv":
                _C.set_cpu_capability_for(other, "avx2")
        assert ops_conv.conv2d_algorithm(x, w) == "nhwc"
        _C.set_cpu_capability_for("conv", "avx2")
        for other in _FAMILIES:
            if other != "conv":
                _C.set_cpu_capability_for(other, "avx512")
        assert ops_conv.conv2d_algorithm(x, w) == "gemm"
    finally:
        for f in _FAMILIES:
            _C.set_cpu_capability_for(f, "auto")


def test_set_cpu_capability_for_one_family():
    """One family forced, then 'auto': the others keep their choice, a setting for every family
    overrides it, and bad names raise ValueError naming what was wrong."""
    auto = dict(_C.cpu_capability_by_kernel())
    assert set(auto) == set(_FAMILIES)
    try:
        _C.set_cpu_capability_for("recurrent_backward", "default")
        now = dict(_C.cpu_capability_by_kernel())
        assert now == {**auto, "recurrent_backward": "default"}
        if _C.cpu_supports_avx2():
            _C.set_cpu_capability("avx2")
            assert set(_C.cpu_capability_by_kernel().values()) == {"avx2"}
            _C.set_cpu_capability("auto")
            assert dict(_C.cpu_capability_by_kernel()) == now
        _C.set_cpu_capability_for("recurrent_backward", "auto")
        assert dict(_C.cpu_capability_by_kernel()) == auto
        with pytest.raises(ValueError, match="no kernel family 'lstm'"):
            _C.set_cpu_capability_for("lstm", "avx2")
        with pytest.raises(ValueError, match="expected 'default', 'avx2' or 'avx512'"):
            _C.set_cpu_capability_for("conv", "avx1024")
        assert dict(_C.cpu_capability_by_kernel()) == auto
    finally:
        _C.set_cpu_capability("auto")
        for f in _FAMILIES:
            _C.set_cpu_capability_for(f, "auto")


def test_env_var_rejects_unknown_path():
    r = run_py("import fastdl, numpy as np; fastdl.ops.sgd_step(np.ones(3, np.float32), "
               "np.ones(3, np.float32), lr=0.1)", FASTDL_CPU_CAPABILITY="avx1024")
    assert r.returncode != 0
    assert "FASTDL_CPU_CAPABILITY" in r.stderr and "Segmentation" not in r.stderr


def test_numpy_users_never_import_torch():
    r = run_py("import sys, numpy as np, fastdl\n"
               "p = np.random.rand(8).astype(np.float32); g = np.random.rand(8).astype(np.float32)\n"
               "m, v = np.zeros_like(p), np.zeros_like(p)\n"
               "fastdl.ops.adam_step(p, g, m, v, step=1)\n"
               "assert 'torch' not in sys.modules, 'torch was imported'\n"
               "print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_set_num_threads_validates_and_applies():
    before = fastdl.get_num_threads()
    try:
        fastdl.set_num_threads(1)
        assert fastdl.get_num_threads() == 1
        p = np.random.rand(100000).astype(np.float32)
        q = p.copy()
        g = np.random.rand(100000).astype(np.float32)
        fastdl.ops.sgd_step(p, g, lr=0.5)
        fastdl.set_num_threads(2)
        fastdl.ops.sgd_step(q, g, lr=0.5)
        assert np.array_equal(p, q), "result must not depend on the thread count"
    finally:
        fastdl.set_num_threads(before)
    with pytest.raises(ValueError, match="n >= 1"):
        fastdl.set_num_threads(0)
    with pytest.raises(TypeError, match="int"):
        fastdl.set_num_threads(1.5)


def test_set_num_threads_leaves_torch_alone():
    import torch
    before_t, before_f = torch.get_num_threads(), fastdl.get_num_threads()
    try:
        fastdl.set_num_threads(1)
        assert torch.get_num_threads() == before_t
    finally:
        fastdl.set_num_threads(before_f)


def test_kernels_release_the_gil():
    """A Python thread keeps running while a long kernel runs in another thread."""
    import threading
    import time
    p = np.random.rand(20_000_000).astype(np.float32)
    g = np.random.rand(20_000_000).astype(np.float32)
    ticks = []
    done = threading.Event()

    def counter():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    t = threading.Thread(target=counter)
    t.start()
    time.sleep(0.01)
    start = time.perf_counter()
    for _ in range(5):
        fastdl.ops.sgd_step(p, g, lr=0.1)
    end = time.perf_counter()
    done.set()
    t.join()
    during = [x for x in ticks if start < x < end]
    assert len(during) >= 3, f"only {len(during)} ticks while kernels ran for {end - start:.3f}s"


@pytest.mark.parametrize("call", [
    lambda m: fastdl.ops.matmul(m(3, 3), m(3, 3)),
    lambda m: fastdl.ops.linear(m(2, 3), m(4, 3)),
    lambda m: fastdl.ops.max_pool2d(m(1, 2, 4, 4), 2),
    lambda m: fastdl.ops.avg_pool2d(m(1, 2, 4, 4), 2),
    lambda m: fastdl.ops.adaptive_avg_pool2d(m(1, 2, 4, 4), 1),
    lambda m: fastdl.ops.adaptive_max_pool2d(m(1, 2, 4, 4), 1),
    lambda m: fastdl.ops.sgd_step(m(3), m(3), lr=0.1),
    lambda m: fastdl.ops.adam_step(m(3), m(3), m(3), m(3), step=1),
], ids=["matmul", "linear", "max_pool2d", "avg_pool2d", "adaptive_avg", "adaptive_max", "sgd",
        "adam"])
def test_meta_tensors_raise_everywhere(call):
    """Tensors on a device fastdl has no kernels for (meta: data_ptr 0) raise in fastdl.ops,
    never crash (fastdl.nn hands meta calls to torch's ops: tests/test_meta.py)."""
    import torch
    import fastdl.nn  # noqa: F401

    def meta(*shape):
        return torch.randn(*shape, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        call(meta)


def test_cpu_feature_flags_agree_with_the_os():
    """cpu_supports_avx512_bf16 (fastdl._support's bfloat16 rule, about the processor whatever
    this build compiled) agrees with /proc/cpuinfo's avx512_bf16 flag on Linux."""
    bf16 = _C.cpu_supports_avx512_bf16()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    assert bf16 == ("avx512_bf16" in flags)


def test_cpuid_family_model_decoding():
    """CPUID leaf 1's eax as Linux's /proc/cpuinfo reads it: base family, plus the extended
    family when the base is 0xf; base model, plus the extended model for families 6 and 0xf."""
    cases = {0x00B00F21: (0x1A, 0x02),   # EPYC 9005 (Zen 5, Turin): this project's Zen 5 VM
             0x00A10F11: (0x19, 0x11),   # EPYC 9004 (Zen 4, Genoa)
             0x00A00F11: (0x19, 0x01),   # EPYC 7003 (Zen 3, Milan)
             0x00B20F40: (0x1A, 0x24),   # Ryzen AI 300 (Zen 5, Strix Point)
             0x00B40F40: (0x1A, 0x44),   # Ryzen 9000 (Zen 5, Granite Ridge)
             0x000806F8: (0x06, 0x8F),   # Xeon 4th gen (Sapphire Rapids)
             0x00000F41: (0x0F, 0x04)}   # a family-0xf part with no extended fields
    for eax, want in cases.items():
        assert _C.decode_cpuid_family_model(eax) == want, hex(eax)


def test_avx512_build_table():
    """The automatic build per kernel family on CPUs that run AVX-512 (cpu_features.cpp): Intel
    everywhere; full-width Zen 5 everywhere but pooling; Zen 4 and mobile Zen 5 only the GEMM,
    the recurrent forward and the optimizers; unmeasured AMD models (Zen 6) the AVX2 fallback."""
    fams = _FAMILIES + ("base",)
    def table(vendor, cpu_family, model):
        return {f: _C.avx512_cpu_choice(vendor, cpu_family, model, f) for f in fams}
    everywhere = {f: "avx512" for f in fams}
    split = {f: "avx512" if f in _AMD_AVX512_FAMILIES else "avx2" for f in fams}
    assert table("intel", 6, 0x8F) == everywhere
    for model in (0x02, 0x11, 0x44, 0x70):       # Turin, Turin dense, Granite Ridge, Strix Halo
        assert table("amd", 0x1A, model) == {**everywhere, "pool": "avx2"}, hex(model)
    for family, model in ((0x19, 0x11), (0x19, 0x61), (0x1A, 0x24), (0x1A, 0x60)):
        assert table("amd", family, model) == split, (hex(family), hex(model))
    for family, model in ((0x1A, 0x50), (0x1A, 0x90), (0x17, 0x31)):   # Zen 6, Zen 2
        assert set(table("amd", family, model).values()) == {"avx2"}, (hex(family), hex(model))
    assert set(table("other", 0x1A, 0x02).values()) == {"avx2"}
    with pytest.raises(ValueError, match="no kernel family"):
        _C.avx512_cpu_choice("amd", 0x1A, 0x02, "convolution")
