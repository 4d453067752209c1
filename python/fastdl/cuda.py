"""CUDA availability as fastdl sees it (independent of torch's view).

>>> import fastdl
>>> fastdl.cuda.is_available()   # False on a machine without a GPU, or a build without CUDA
False

A device is usable when the driver supports the CUDA runtime fastdl links and fastdl carries code
for the device's architecture (machine code for its major version, or PTX as old or older);
``unavailable_reason()`` names what is missing otherwise. An emulation build (CI's
``FASTDL_CUDA_EMULATION=ON``) runs the CUDA kernels on the CPU and is never "available".
"""
from __future__ import annotations

from . import _C

_NO_DEVICE_ERRORS = {100: "no CUDA-capable device is detected", 3: "CUDA initialisation failed"}
_INSUFFICIENT_DRIVER = 35


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _parse_archs(archs: list[str]) -> tuple[list[int], list[int]]:
    """CMake's architecture list ('75-real', '90', '90-virtual') as (machine-code archs, PTX archs)."""
    sass, ptx = [], []
    for a in archs:
        num, _, kind = a.partition("-")
        if not num.isdigit():
            continue
        if kind in ("", "real"):
            sass.append(int(num))
        if kind in ("", "virtual"):
            ptx.append(int(num))
    return sass, ptx


def decide(compiled: bool, emulated: bool, probe: list[int], archs: list[str]) -> tuple[list[int], str]:
    """Which devices fastdl can use, and why not when none: (usable device indices, reason).
    `probe` is _C.cuda_probe()'s list: runtime version, driver version, cudaGetDeviceCount's error,
    device count, then (major, minor) per device. Pure, so tests inject any machine."""
    if not compiled:
        return [], "this fastdl build has no CUDA kernels (built without nvcc or with FASTDL_CUDA=OFF)"
    if emulated:
        return [], "this is a CUDA emulation build: the CUDA kernels run on the CPU, there is no GPU"
    runtime, driver, err, count = probe[:4]
    # CUDA minor-version compatibility: a 13.0 driver runs a 13.x runtime's code, so only an older
    # major version rules the driver out before cudaGetDeviceCount says so (error 35). PTX newer
    # than the driver's JIT (error 222) surfaces at fastdl's kernel-image check, per launch.
    if driver == 0 and err == _INSUFFICIENT_DRIVER:   # what the static runtime says with no driver
        return [], (f"no NVIDIA driver is installed (fastdl links the CUDA {_version(runtime)} "
                    f"runtime; a GPU needs a driver for CUDA {_version(runtime)} or newer)")
    if err == _INSUFFICIENT_DRIVER or (driver and runtime and driver // 1000 < runtime // 1000):
        return [], (f"the NVIDIA driver supports CUDA {_version(driver)}, but fastdl links the CUDA "
                    f"{_version(runtime)} runtime: install a driver for CUDA {_version(runtime)} "
                    "or newer")
    if err != 0 or count == 0:
        return [], f"no CUDA device ({_NO_DEVICE_ERRORS.get(err, f'cudaGetDeviceCount error {err}')})"
    sass, ptx = _parse_archs(archs)
    usable, too_old = [], []
    for d in range(count):
        major, minor = probe[4 + 2 * d], probe[5 + 2 * d]
        cc = major * 10 + minor
        if any(a // 10 == major and a <= cc for a in sass) or any(a <= cc for a in ptx):
            usable.append(d)
        else:
            too_old.append(f"device {d} is sm_{cc}")
    if usable:
        return usable, ""
    built = ", ".join(archs) or "none"
    return [], (f"fastdl has no code for this GPU ({'; '.join(too_old)}; built for {built}): "
                "rebuild with CMAKE_CUDA_ARCHITECTURES including it")


def _state() -> tuple[list[int], str]:
    archs = [a for a in _C.cuda_arch_list().split(",") if a]
    compiled = bool(_C.cuda_compiled())
    probe = list(_C.cuda_probe()) if compiled else [0, 0, 0, 0]
    return decide(compiled, bool(_C.cuda_emulated()), probe, archs)


def is_compiled() -> bool:
    """True when this build of fastdl contains CUDA kernels (compiled by nvcc, or emulated)."""
    return bool(_C.cuda_compiled())


def is_emulated() -> bool:
    """True in a CUDA emulation build (tests only): CUDA kernels run on the CPU."""
    return bool(_C.cuda_emulated())


def device_count() -> int:
    """Number of CUDA devices fastdl can use (0 without a driver, a device, code for the device's
    architecture, or CUDA kernels). Their indices are usable_devices(): not always 0..n-1 (a
    machine may mix GPUs fastdl has code for with older ones)."""
    return len(_state()[0])


def usable_devices() -> list[int]:
    """The CUDA device indices fastdl can use (see device_count)."""
    return list(_state()[0])


def is_available() -> bool:
    """True only when CUDA kernels were compiled for a real GPU and at least one device can run them."""
    return device_count() > 0


def unavailable_reason() -> str:
    """Why is_available() is False ('' when it is True), naming what is needed."""
    return _state()[1]


def get_device_name(device: int = 0) -> str:
    """The name of a CUDA device, e.g. 'NVIDIA H100 80GB HBM3'."""
    if not is_available():
        raise RuntimeError(f"fastdl.cuda: no CUDA device is available: {unavailable_reason()}")
    return _C.cuda_device_name(int(device))


def synchronize(device: int = 0) -> None:
    """Waits for fastdl's work on `device` and raises RuntimeError if a kernel failed."""
    _C.cuda_synchronize(int(device))
