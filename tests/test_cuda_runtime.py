"""CUDA availability decisions (issue 7, defect 7) on injected machines, the test suite's CUDA mode,
and the emulated back end's own promises: all-or-nothing optimizer steps (defect 5), launches on
non-default streams, launch counts. Emulation-only tests skip elsewhere with that reason."""
import pytest
import torch

import fastdl
import fastdl.optim as fo
from cuda_mode import cuda_test_mode
from fastdl import _C, _tensor, ops
from fastdl.cuda import decide
from helpers import assert_close

ARCHS = ["75-real", "80-real", "86-real", "89-real", "90"]
needs_emulation = pytest.mark.skipif(not fastdl.cuda.is_emulated(),
                                     reason="needs the emulated CUDA back end (FASTDL_CUDA_EMULATION=ON)")


def probe(runtime=13000, driver=13000, err=0, caps=((9, 0),)):
    out = [runtime, driver, err, len(caps)]
    for major, minor in caps:
        out += [major, minor]
    return out


# ---- defect 7: which devices fastdl can use, and why not ---------------------------------------

def test_decide_usable_devices():
    assert decide(True, False, probe(caps=((9, 0), (8, 6))), ARCHS) == ([0, 1], "")
    # machine code for 8.0 runs on 8.9's major; PTX 90 JIT-compiles for newer GPUs
    assert decide(True, False, probe(caps=((8, 7),)), ARCHS)[0] == [0]
    assert decide(True, False, probe(caps=((12, 0),)), ARCHS)[0] == [0]


def test_decide_driver_too_old_names_what_is_needed():
    usable, why = decide(True, False, probe(driver=12020, err=35), ARCHS)
    assert usable == [] and "driver supports CUDA 12.2" in why and "CUDA 13.0 or newer" in why
    usable, why = decide(True, False, probe(driver=12080), ARCHS)  # older driver, no error yet
    assert usable == [] and "12.8" in why


def test_decide_no_driver_says_so():
    usable, why = decide(True, False, probe(driver=0, err=35, caps=()), ARCHS)
    assert usable == [] and "no NVIDIA driver" in why and "CUDA 0.0" not in why


def test_decide_minor_version_compatibility():
    """A 13.0 driver runs code built with the 13.1 runtime (CUDA minor-version compatibility)."""
    assert decide(True, False, probe(runtime=13010, driver=13000), ARCHS) == ([0], "")


def test_decide_usable_indices_need_not_be_contiguous():
    usable, why = decide(True, False, probe(caps=((7, 0), (9, 0))), ARCHS)
    assert usable == [1] and why == ""


def test_decide_gpu_older_than_oldest_arch():
    usable, why = decide(True, False, probe(caps=((7, 0),)), ARCHS)
    assert usable == [] and "sm_70" in why and "75-real" in why and "CMAKE_CUDA_ARCHITECTURES" in why
    # sm_86 machine code only: a 9.0 GPU has no code (no PTX), an 8.9 one runs it
    assert decide(True, False, probe(caps=((9, 0),)), ["86-real"])[0] == []
    assert decide(True, False, probe(caps=((8, 9), (9, 0))), ["86-real"])[0] == [0]


def test_decide_no_device_build_or_emulation():
    assert decide(True, False, probe(err=100, caps=()), ARCHS) == (
        [], "no CUDA device (no CUDA-capable device is detected)")
    assert "no CUDA kernels" in decide(False, False, probe(), [])[1]
    assert "emulation" in decide(True, True, probe(), ["emulated"])[1]


def test_is_available_agrees_with_the_decision():
    usable, why = fastdl.cuda._state()
    assert fastdl.cuda.is_available() == bool(usable)
    assert fastdl.cuda.usable_devices() == usable and fastdl.cuda.device_count() == len(usable)
    assert (why == "") == fastdl.cuda.is_available()
    if fastdl.cuda.is_emulated():
        assert not fastdl.cuda.is_available() and fastdl.build_info()["cuda_emulation"]
        assert fastdl.build_info()["cuda_device_count"] == 0


@pytest.mark.parametrize("emulated,fast,torch_gpu,mode", [
    (True, False, False, "emulate"), (False, True, True, "gpu"), (False, False, True, "fail"),
    (False, True, False, "skip"), (False, False, False, "skip")])
def test_cuda_test_mode(emulated, fast, torch_gpu, mode):
    got, why = cuda_test_mode(emulated, fast, "driver too old", torch_gpu)
    assert got == mode
    if mode == "fail":
        assert "driver too old" in why


# ---- defect 5: a CUDA optimizer step that raises changes nothing --------------------------------

@needs_emulation
@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
@pytest.mark.parametrize("count", [3, 40])  # one launch; two launches (more than 36 tensors)
def test_failed_cuda_step_changes_nothing(cuda_device, name, count):
    ps = [torch.randn(5, requires_grad=True) for _ in range(count)]
    opt = getattr(fo, name)(ps, lr=0.1)
    for p in ps:
        p.grad = torch.randn(5)
    opt.step()
    saved = [p.detach().clone() for p in ps]
    _C.cuda_emulation_missing_kernel_image(True)
    try:
        with pytest.raises(RuntimeError, match="no kernel image"):
            opt.step()
    finally:
        _C.cuda_emulation_missing_kernel_image(False)
    assert all(float(opt.state[p]["step"]) == 1.0 for p in ps), "a step that raised moved the counters"
    assert all(torch.equal(p.detach(), s) for p, s in zip(ps, saved))
    opt.step()
    assert all(float(opt.state[p]["step"]) == 2.0 for p in ps)


@needs_emulation
@pytest.mark.parametrize("nesterov", [False, True])
def test_failed_first_sgd_step_leaves_no_state(cuda_device, nesterov):
    """A first momentum step that raises creates no momentum buffer (it would be torch.empty
    memory that the next step takes for history) and no cached entry: the next step is a first
    step, as torch's."""
    kw = dict(lr=0.1, momentum=0.9, nesterov=nesterov, dampening=0.0 if nesterov else 0.5)
    ps = [torch.randn(7, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    ref_ps = [p.detach().clone().requires_grad_() for p in ps]
    opt, ref = fo.SGD(ps, **kw), torch.optim.SGD(ref_ps, **kw)
    for p, q in zip(ps, ref_ps):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    saved = [p.detach().clone() for p in ps]
    _C.cuda_emulation_missing_kernel_image(True)
    try:
        with pytest.raises(RuntimeError, match="no kernel image"):
            opt.step()
    finally:
        _C.cuda_emulation_missing_kernel_image(False)
    assert all(torch.equal(p.detach(), s) for p, s in zip(ps, saved))
    assert all(len(opt.state[p]) == 0 for p in ps), "a step that raised created state"
    for _ in range(2):
        opt.step()
        ref.step()
    for p, q in zip(ps, ref_ps):
        assert_close(p.detach(), q.detach(), what="param")
        assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], what="buf")


@needs_emulation
def test_single_tensor_op_steps_launch_cuda_kernels(cuda_device):
    """The single-tensor shortcuts of ops.sgd_step/adam_step must not bypass the CUDA path when
    CPU tensors are routed to it (they did: no launch, and float64 was accepted)."""
    p, g = torch.randn(11), torch.randn(11)
    m, v = torch.zeros(11), torch.zeros(11)
    before = _C.cuda_emulation_launch_count()
    ops.sgd_step(p, g, lr=0.1)
    ops.adam_step(p, g, m, v, step=1)
    assert _C.cuda_emulation_launch_count() - before == 2
    with pytest.raises(Exception, match="float64"):
        ops.sgd_step(p.double(), g.double(), lr=0.1)


@needs_emulation
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_step_failing_between_launches(cuda_device, name):
    """40 tensors take two launches. Everything that can fail is checked before the first, so a
    failure at the second is a device fault of the first surfacing there: sticky, the context is
    lost (as a GPU's, where torch's work fails too). What is promised then: the step raises, the
    step counters and first-step state are as before it, and the device stays unusable until a
    reset (a new process); params the first launch updated are not restored."""
    ps = [torch.randn(5, requires_grad=True) for _ in range(40)]
    opt = getattr(fo, name)(ps, lr=0.1, **({"momentum": 0.9} if name == "SGD" else {}))
    for p in ps:
        p.grad = torch.randn(5)
    before = _C.cuda_emulation_launch_count()
    _C.cuda_emulation_fail_launch(2)
    with pytest.raises(RuntimeError, match="unspecified launch failure"):
        opt.step()
    assert _C.cuda_emulation_launch_count() - before == 2
    assert all(len(opt.state[p]) == 0 for p in ps), "first-step state kept after a failure"
    with pytest.raises(RuntimeError, match="unspecified launch failure"):  # sticky
        opt.step()
    _C.cuda_emulation_reset()
    opt.step()   # after a reset: a first step again, counters from zero
    if name == "Adam":
        assert all(float(opt.state[p]["step"]) == 1.0 for p in ps)


@needs_emulation
def test_failed_op_step_changes_nothing(cuda_device):
    params = [torch.randn(5) for _ in range(40)]
    grads = [torch.randn(5) for _ in range(40)]
    bufs = [torch.randn(5) for _ in range(40)]
    before = [p.clone() for p in params] + [b.clone() for b in bufs]
    _C.cuda_emulation_missing_kernel_image(True)
    try:
        with pytest.raises(RuntimeError, match="no kernel image"):
            ops.sgd_step(params, grads, bufs, lr=0.1, momentum=0.9)
    finally:
        _C.cuda_emulation_missing_kernel_image(False)
    assert all(torch.equal(a, b) for a, b in zip(params + bufs, before))


# ---- every op on a non-default stream (emulated streams are checked handles) --------------------

@needs_emulation
def test_ops_on_a_non_default_stream(cuda_device):
    stream = _C.cuda_emulation_stream_create()
    try:
        _tensor.route_cpu_to_cuda(True, stream)
        x = torch.randn(2, 3, 9, 8)
        y, idx = ops.max_pool2d(x, 3, 2, 1, return_indices=True)
        assert_close(y, torch.nn.functional.max_pool2d(x, 3, 2, 1), what="max_pool2d")
        a, b = torch.randn(17, 9), torch.randn(9, 13)
        assert_close(ops.matmul(a, b), a @ b, what="gemm", reduction=9)
        p, g = [torch.randn(11)], [torch.randn(11)]
        ref = p[0] - 0.1 * g[0]
        ops.sgd_step(p, g, lr=0.1)
        assert_close(p[0], ref, what="sgd")
    finally:
        _tensor.route_cpu_to_cuda(True)
        _C.cuda_emulation_stream_destroy(stream)
    # A handle the runtime never made is refused, so the front ends must pass the real one.
    _tensor.route_cpu_to_cuda(True, stream)
    try:
        with pytest.raises(RuntimeError, match="invalid resource handle"):
            ops.max_pool2d(torch.randn(1, 1, 4, 4), 2)
    finally:
        _tensor.route_cpu_to_cuda(True)


@needs_emulation
def test_cuda_cases_launch_kernels(cuda_device):
    """The 'cuda' case reaches the CUDA kernels (not the CPU ones)."""
    before = _C.cuda_emulation_launch_count()
    ops.max_pool2d(torch.randn(1, 2, 5, 5), 2)
    assert _C.cuda_emulation_launch_count() == before + 1


def test_route_needs_an_emulation_build():
    if fastdl.cuda.is_emulated():
        pytest.skip("this is an emulation build")
    with pytest.raises(RuntimeError, match="emulated"):
        _tensor.route_cpu_to_cuda(True)
