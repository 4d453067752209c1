"""Matrix multiply on numpy arrays or torch tensors: fastdl's own GEMM (csrc/cpu/gemm.cpp,
csrc/cuda/gemm.cu), C = alpha * op(A) @ op(B) + beta * C.

Operands may be any 2-D strided views: a row-major view with a leading dimension (``big[:, :5]``)
or a transposed one (``x.T``) goes to the kernel as it is; anything else (negative or
non-unit inner strides) is copied first. CPU: float32 and float64; CUDA: float32, with the TF32
tensor-core path when ``torch.backends.cuda.matmul.allow_tf32`` is set (torch's flag and default).

>>> a, b = np.random.rand(3, 4).astype(np.float32), np.random.rand(4, 5).astype(np.float32)
>>> fastdl.ops.matmul(a, b)                 # == a @ b (torch.mm for 2-D tensors)
"""
from __future__ import annotations

import numpy as np

from .. import _C, _tensor

__all__ = ["matmul", "gemm"]

_NAMES = {_tensor.FLOAT32: "float32", _tensor.FLOAT64: "float64", _tensor.FLOAT16: "float16",
          _tensor.BFLOAT16: "bfloat16", _tensor.INT64: "int64"}
_TORCH_SHORT = {_tensor.FLOAT32: "float", _tensor.FLOAT64: "double", _tensor.FLOAT16: "c10::Half",
                _tensor.BFLOAT16: "c10::BFloat16", _tensor.INT64: "long int"}


def _where(device: int) -> str:
    return "cpu" if device < 0 else f"cuda:{device}"


def check_operands(fn: str, named: dict, cuda_half: bool = False):
    """Checks that the named arrays/tensors share kind, device and a supported dtype (float32 and
    float64 on the CPU; float32 on CUDA, and float16/bfloat16 too when cuda_half is True).
    Returns (dtype code, device index). Raises torch's exception classes.
    (One pass with few attribute reads: this runs on every small RNN-sized call.)"""
    first_name, first = next(iter(named.items()))
    kind = _tensor.kind(first)
    if kind not in ("numpy", "torch"):
        raise TypeError(f"{fn}: expected {first_name} to be a numpy array or a torch tensor, "
                        f"got {kind}")
    cls = np.ndarray
    if kind == "torch":
        import torch
        cls = torch.Tensor
        dev = first.device
        if dev.type not in ("cpu", "cuda"):
            raise RuntimeError(f"{fn}: {first_name} is on {dev}; fastdl supports cpu and cuda")
        if dev.type == "cuda":
            from .. import cuda
            if not cuda.is_compiled():
                raise RuntimeError(f"{fn}: {first_name} is on {dev}, but this fastdl build "
                                   "has no CUDA kernels (rebuild with nvcc present)")
    dtype = first.dtype
    for name, x in named.items():
        if not isinstance(x, cls):
            raise TypeError(f"{fn}: expected {name} to be a {kind} "
                            f"{'array' if kind == 'numpy' else 'tensor'} like {first_name}, "
                            f"got {_tensor.describe(x)}")
        if kind == "torch":
            if x.layout != torch.strided:
                raise RuntimeError(f"{fn}: {name} is sparse; fastdl needs dense tensors")
            if x.device != dev:
                raise RuntimeError(f"{fn}: expected all tensors to be on the same device, but "
                                   f"{name} is on {x.device} and {first_name} on {dev}")
    device = _tensor.device_index(first)
    code = _tensor.dtype_code(first)
    allowed = ((_tensor.FLOAT32, _tensor.FLOAT64) if device < 0 else
               (_tensor.FLOAT32, _tensor.FLOAT16, _tensor.BFLOAT16) if cuda_half else
               (_tensor.FLOAT32,))
    if code not in allowed:
        raise NotImplementedError(
            f"{fn}: {first_name} is a {_tensor.describe(first)}; supported dtypes on "
            f"{_where(device).split(':')[0]} are {', '.join(_NAMES[c] for c in allowed)}")
    for name, x in named.items():
        if x.dtype != dtype:
            raise RuntimeError(f"{fn}: expected {name} to have the same dtype as {first_name} "
                               f"({_NAMES[code]}), got {_tensor.describe(x)}")
    return code, device


def _elem_strides(x):
    if isinstance(x, np.ndarray):
        return tuple(s // x.itemsize if s % x.itemsize == 0 else None for s in x.strides)
    return tuple(x.stride())


def operand(x):
    """(buffer, transposed, ld) that presents the 2-D array/tensor x to the kernel without a copy
    where its strides allow: row-major with ld >= cols, or column-major (a transposed view) with
    ld >= rows. Otherwise a contiguous copy (never a wrong read)."""
    rows, cols = x.shape
    s0, s1 = _elem_strides(x)
    if s0 is not None and s1 is not None:
        if (s1 == 1 or cols <= 1) and (rows <= 1 or s0 >= max(cols, 1)):
            return x, False, (s0 if rows > 1 else max(cols, 1))
        if (s0 == 1 or rows <= 1) and (cols <= 1 or s1 >= max(rows, 1)):
            return x, True, (s1 if cols > 1 else max(rows, 1))
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x), False, max(cols, 1)
    return x.contiguous(), False, max(cols, 1)


def _allow_tf32(device: int) -> bool:
    if device < 0:
        return False
    import torch
    return bool(torch.backends.cuda.matmul.allow_tf32)


def launch(a, b, c, *, alpha, beta, code, device):
    """Unchecked: c[m, n] = alpha * a[m, k] @ b[k, n] + beta * c for validated 2-D operands of one
    dtype and device; a and b any strided views (see `operand`); c row-major with unit inner
    stride. Used by the ops front ends (matmul, gemm, linear)."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return c
    a_buf, ta, lda = operand(a)
    b_buf, tb, ldb = operand(b)
    s0 = _elem_strides(c)[0]
    ldc = s0 if m > 1 else max(n, 1)
    _C.gemm(_tensor.pointer(a_buf), _tensor.pointer(b_buf), _tensor.pointer(c), ta, tb, m, n, k,
            float(alpha), float(beta), lda, ldb, ldc, code, device,
            _tensor.current_stream(device), _allow_tf32(device))
    return c


def _overlaps(c, x) -> bool:
    """Conservative aliasing test: numpy by address bounds, torch by shared storage."""
    if isinstance(c, np.ndarray):
        return bool(np.may_share_memory(c, x))
    return c.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def _check_matrix(fn, name, x):
    if x.ndim != 2:
        raise RuntimeError(f"{fn}: expected {name} to be a matrix (2 dims), got "
                           f"{_tensor.describe(x)}")


def _empty(like, m, n):
    if isinstance(like, np.ndarray):
        return np.empty((m, n), dtype=like.dtype)
    import torch
    return torch.empty((m, n), dtype=like.dtype, device=like.device)


def _plain(x):
    """A torch tensor without autograd history (the kernels do not record a graph), its negative
    bit resolved (a real view such as z.conj().imag reads negated values from its memory)."""
    if isinstance(x, np.ndarray):
        return x
    if x.is_neg():
        x = x.resolve_neg()
    if x._is_zerotensor():  # torch's known-zero gradients have no storage (data_ptr 0)
        x = x.clone()
    return x.detach() if x.requires_grad else x


def matmul(a, b):
    """a @ b for 2-D numpy arrays or torch tensors (same dtype and device), by fastdl's GEMM.
    Matches torch.mm / np.matmul on matrices; returns a new array/tensor of a's kind.

    >>> c = fastdl.ops.matmul(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32))
    >>> c.shape                                    # (2, 4), like torch.mm
    """
    fn = "matmul"
    code, device = check_operands(fn, {"a": a, "b": b})
    _check_matrix(fn, "a", a)
    _check_matrix(fn, "b", b)
    if a.shape[1] != b.shape[0]:
        raise RuntimeError(f"{fn}: a and b shapes cannot be multiplied ({a.shape[0]}x{a.shape[1]} "
                           f"and {b.shape[0]}x{b.shape[1]}): expected b with {a.shape[1]} rows")
    a, b = _plain(a), _plain(b)
    c = _empty(a, a.shape[0], b.shape[1])
    return launch(a, b, c, alpha=1.0, beta=0.0, code=code, device=device)


def gemm(a, b, c=None, *, alpha=1.0, beta=0.0, trans_a=False, trans_b=False):
    """BLAS GEMM: c = alpha * op(a) @ op(b) + beta * c, op(x) = x.T when trans_x, for 2-D numpy
    arrays or torch tensors. With c=None a new result is returned (beta is then ignored);
    otherwise c is updated in place and returned (it must be row-major with unit inner stride,
    e.g. a contiguous array or a column slice of one). beta == 0 never reads c.

    >>> fastdl.ops.gemm(a, b, c, alpha=2.0, beta=1.0, trans_b=True)    # c += 2 * a @ b.T
    """
    fn = "gemm"
    named = {"a": a, "b": b}
    if c is not None:
        named["c"] = c
    code, device = check_operands(fn, named)
    for name, x in named.items():
        _check_matrix(fn, name, x)
    for name, v in (("alpha", alpha), ("beta", beta)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise TypeError(f"{fn}: expected {name} to be a real number, got {type(v).__name__}")
    a = _plain(a).T if trans_a else _plain(a)
    b = _plain(b).T if trans_b else _plain(b)
    m, k = a.shape
    if b.shape[0] != k:
        raise RuntimeError(f"{fn}: op(a) and op(b) shapes cannot be multiplied ({m}x{k} and "
                           f"{b.shape[0]}x{b.shape[1]}): expected op(b) with {k} rows")
    n = b.shape[1]
    if c is None:
        return launch(a, b, _empty(a, m, n), alpha=alpha, beta=0.0, code=code, device=device)
    if tuple(c.shape) != (m, n):
        raise RuntimeError(f"{fn}: expected c of shape ({m}, {n}), got {_tensor.describe(c)}")
    if isinstance(c, np.ndarray) and not c.flags.writeable:
        raise ValueError(f"{fn}: c is read-only, but it is updated in place")
    if _tensor.is_torch(c) and c.requires_grad and c.is_leaf:
        import torch
        if torch.is_grad_enabled():
            raise RuntimeError(f"{fn}: c is a leaf tensor that requires grad and is updated in "
                               "place; call gemm under torch.no_grad()")
    if m == 0 or n == 0:  # nothing to write (and an empty c's strides and address mean nothing:
        return c          # numpy reports (0, 0), torch a null pointer shared with empty a or b)
    for name, x in (("a", a), ("b", b)):
        if _overlaps(c, x):
            raise ValueError(f"{fn}: c overlaps {name} in memory; the output must not alias an "
                             "input (pass a separate c)")
    s0, s1 = _elem_strides(c)
    if not ((s1 == 1 or n <= 1) and (m <= 1 or (s0 is not None and s0 >= max(n, 1)))):
        raise ValueError(f"{fn}: expected c to be row-major with unit inner stride (it is "
                         f"updated in place), got strides {_elem_strides(c)}; pass a contiguous c")
    launch(a, b, _plain(c), alpha=alpha, beta=beta, code=code, device=device)
    return c
