"""How the test suite treats its CUDA cases, decided from what fastdl and torch report (pure, so
tests/test_cuda_runtime.py checks every combination on the CPU)."""


def cuda_test_mode(fastdl_emulated: bool, fastdl_available: bool, fastdl_reason: str,
                   torch_available: bool) -> tuple[str, str]:
    """('emulate' | 'gpu' | 'skip' | 'fail', reason).
    emulate: an emulation build runs the CUDA cases on CPU tensors through the CUDA path.
    gpu: both fastdl and torch see a device. fail: torch sees a usable GPU and fastdl does not,
    which is a broken build or install, so every CUDA case fails with fastdl's reason instead of
    skipping. skip: no GPU anywhere (or only fastdl sees one: the tests need torch's CUDA tensors)."""
    if fastdl_emulated:
        return "emulate", ""
    if fastdl_available and torch_available:
        return "gpu", ""
    if torch_available:
        return "fail", (f"torch sees a CUDA device but fastdl cannot use it: {fastdl_reason}")
    if fastdl_available:
        return "skip", "no CUDA device for torch (CPU-only torch): the CUDA tests need torch CUDA tensors"
    return "skip", f"no CUDA device: {fastdl_reason}"


# The emulated device's SM count (csrc/cuda/emulation/emu_runtime.cpp, kSmCount): GEMM picks its
# 64 x 64 tiles below 2 x SMs tiles of 128 x 128, so tests size their shapes by it.
EMULATED_SM_COUNT = 4


def sm_count(emulated: bool) -> int:
    if emulated:
        return EMULATED_SM_COUNT
    import torch
    return torch.cuda.get_device_properties(0).multi_processor_count
