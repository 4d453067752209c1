"""Recurrent layers on numpy arrays or torch tensors: one layer and one direction per call, forward
and backward through time in native code (csrc/cpu/rnn.cpp, float32 and float64; csrc/cuda/rnn.cu
for CUDA tensors: float32, and float16/bfloat16 tensors with float32 arithmetic and state, rounded
once to the tensors' type), and the cells as one-step layers.

    RNN:  h' = tanh|relu(W_ih x + b_ih + W_hh h + b_hh)
    LSTM: i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh); c' = f c + i g; h' = o tanh(c')
          (with proj_size: h' = W_hr (o tanh(c')))
    GRU:  r, z, n: n = tanh(W_in x + b_in + r (W_hn h + b_hn)); h' = (1 - z) n + z h
Matches torch.nn.RNN / LSTM / GRU (gate order i, f, g, o and r, z, n; weights in torch's layout).

Sequences are time-major: input (T, B, I), output (T, B, R). A variable-length batch is given as
torch's PackedSequence data (N, I) with its batch_sizes (T,), non-increasing (sorted by length).
The forward returns a workspace (what the backward needs) when training=True, else None and
nothing is saved; it is float32 for float16/bfloat16 tensors (workspace_dtype).

>>> x = np.random.rand(7, 2, 3).astype(np.float32)           # (T, B, I)
>>> y, hn, cn, ws = fastdl.ops.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
"""
from __future__ import annotations

import sys

import numpy as np

from .. import _C, _tensor
from .gemm import _plain, check_operands

# CUDA kernels exist (csrc/cuda/rnn.cu; float32, float16, bfloat16): read by fastdl._support.
CUDA_KERNELS = True

__all__ = ["recurrent_layer_forward", "recurrent_layer_backward", "rnn_layer_forward",
           "rnn_layer_backward", "lstm_layer_forward", "lstm_layer_backward",
           "gru_layer_forward", "gru_layer_backward", "rnn_cell_forward", "rnn_cell_backward",
           "lstm_cell_forward", "lstm_cell_backward", "gru_cell_forward", "gru_cell_backward"]

# csrc/rnn.h RnnMode codes and gate counts.
TANH, RELU, LSTM, GRU = 0, 1, 2, 3
_GATES = {TANH: 1, RELU: 1, LSTM: 4, GRU: 3}
_NAMES = {TANH: "rnn_tanh", RELU: "rnn_relu", LSTM: "lstm", GRU: "gru"}


def _mode_of(nonlinearity):
    if nonlinearity == "tanh":
        return TANH
    if nonlinearity == "relu":
        return RELU
    raise ValueError(f"rnn: unknown nonlinearity '{nonlinearity}' (expected 'tanh' or 'relu')")


def _empty(like, shape):
    if isinstance(like, np.ndarray):
        return np.empty(shape, dtype=like.dtype)
    import torch
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def workspace_dtype(x):
    """The element type of the workspace and scratch buffers for tensors like x: x's own, or
    float32 for float16/bfloat16 CUDA tensors (the kernels compute and save in float32)."""
    if isinstance(x, np.ndarray):
        return x.dtype
    import torch
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _empty_acc(like, shape):
    """A buffer of workspace_dtype(like) (workspaces and scratch)."""
    if isinstance(like, np.ndarray):
        return _empty(like, shape)
    import torch
    return torch.empty(shape, dtype=workspace_dtype(like), device=like.device)


def _contig(x):
    return None if x is None else _tensor.contiguous(_plain(x))


def grad_operand(g):
    """A gradient autograd passes to a backward, as the kernels read it: None (zero), or dense
    and contiguous (a loss's sum() sends an expanded one). Its shape, dtype and device are the
    output's: autograd's engine checks every gradient it passes on."""
    if g is None:
        return None
    if g.layout is not sys.modules["torch"].strided:
        g = g.to_dense()
    return _contig(g)


def _pointers(values):
    """Data pointers for the binding (None stays None); the caller keeps `values` alive."""
    return [None if v is None else _tensor.pointer(v) for v in values]


def _batch_sizes(fn, batch_sizes):
    """batch_sizes as a contiguous CPU int64 array/tensor and its values (a list)."""
    if batch_sizes is None:
        return None, None
    if isinstance(batch_sizes, np.ndarray):
        bs = np.ascontiguousarray(batch_sizes, dtype=np.int64)
    else:
        import torch
        if not isinstance(batch_sizes, torch.Tensor):
            raise TypeError(f"{fn}: expected batch_sizes to be an int64 array or tensor, got "
                            f"{type(batch_sizes).__name__}")
        if batch_sizes.device.type != "cpu":
            raise RuntimeError(f"{fn}: batch_sizes must be on the CPU (as PackedSequence keeps "
                               f"them), got a tensor on {batch_sizes.device}")
        bs = batch_sizes.to(torch.int64).contiguous()
    if bs.ndim != 1:
        raise RuntimeError(f"{fn}: expected batch_sizes with 1 dim (steps,), got "
                           f"{_tensor.describe(bs)}")
    values = bs.tolist()
    for t, v in enumerate(values):
        if v < 1 or (t and v > values[t - 1]):
            raise RuntimeError(f"{fn}: batch_sizes must be positive and non-increasing (sorted "
                               f"sequences), got {values}")
    return bs, values


def _geometry(fn, mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    """Validates one layer's operands; returns (geometry tuple for _C, dtype code, device, shapes,
    batch_sizes array/tensor that must stay alive during the call)."""
    named = {"input": input, "hx": hx, "weight_ih": w_ih, "weight_hh": w_hh}
    for name, x in (("cx", cx), ("bias_ih", b_ih), ("bias_hh", b_hh), ("weight_hr", w_hr)):
        if x is not None:
            named[name] = x
    code, device = check_operands(fn, named, cuda_half=True)
    G = _GATES[mode]
    if w_ih.ndim != 2 or w_ih.shape[0] % G or w_ih.shape[0] == 0:
        raise RuntimeError(f"{fn}: expected weight_ih with 2 dims ({G} * hidden_size, input_size),"
                           f" got {_tensor.describe(w_ih)}")
    H = w_ih.shape[0] // G
    I = w_ih.shape[1]
    P = 0
    if w_hr is not None:
        if mode != LSTM:
            raise ValueError(f"{fn}: weight_hr (projection) exists only for LSTM")
        if w_hr.ndim != 2 or w_hr.shape[1] != H or not 0 < w_hr.shape[0] < H:
            raise ValueError(f"{fn}: expected weight_hr of shape (proj_size, {H}) with "
                             f"proj_size < hidden_size={H}, got {_tensor.describe(w_hr)}")
        P = w_hr.shape[0]
    R = P or H
    if tuple(w_hh.shape) != (G * H, R):
        raise RuntimeError(f"{fn}: expected weight_hh of shape ({G * H}, {R}), got "
                           f"{_tensor.describe(w_hh)}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"{fn}: pass both bias_ih and bias_hh, or neither")
    for name, b in (("bias_ih", b_ih), ("bias_hh", b_hh)):
        if b is not None and tuple(b.shape) != (G * H,):
            raise RuntimeError(f"{fn}: expected {name} of shape ({G * H},), got "
                               f"{_tensor.describe(b)}")
    bs, values = _batch_sizes(fn, batch_sizes)
    if bs is None:
        if input.ndim != 3:
            raise RuntimeError(f"{fn}: expected input with 3 dims (steps, batch, input_size), got "
                               f"{_tensor.describe(input)}")
        T, B = input.shape[0], input.shape[1]
        N = T * B
    else:
        if input.ndim != 2:
            raise RuntimeError(f"{fn}: expected packed input with 2 dims (rows, input_size), got "
                               f"{_tensor.describe(input)}")
        T, B, N = len(values), (values[0] if values else 0), sum(values)
        if input.shape[0] != N:
            raise RuntimeError(f"{fn}: packed input has {input.shape[0]} rows but batch_sizes "
                               f"sum to {N}")
    if T == 0:
        raise RuntimeError(f"{fn}: Expected sequence length to be larger than 0 in RNN (got input "
                           f"{_tensor.describe(input)})")
    if input.shape[-1] != I:
        raise RuntimeError(f"{fn}: input.size(-1) must be equal to input_size. Expected {I}, got "
                           f"{input.shape[-1]}")
    if tuple(hx.shape) != (B, R):
        raise RuntimeError(f"{fn}: Expected hidden size ({B}, {R}), got {list(hx.shape)}")
    if mode == LSTM:
        if cx is None:
            raise ValueError(f"{fn}: LSTM needs cx")
        if tuple(cx.shape) != (B, H):
            raise RuntimeError(f"{fn}: Expected cell size ({B}, {H}), got {list(cx.shape)}")
    geometry = (mode, code, T, B, None if bs is None else _tensor.pointer(bs), I, H, P,
                bool(reverse), b_ih is not None)
    return geometry, code, device, (T, B, N, I, H, R), bs


def recurrent_layer_forward(mode, input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *,
                      cx=None, weight_hr=None, batch_sizes=None, reverse=False, training=True):
    """One layer and direction of mode TANH, RELU, LSTM or GRU (module constants).
    Returns (output, h_n, c_n (LSTM, else None), workspace (training, else None)).
    The typed wrappers (lstm_layer_forward, gru_..., rnn_...) are the friendlier entry points."""
    fn = _NAMES[mode] + "_layer_forward"
    geometry, code, device, (T, B, N, I, H, R), bs = _geometry(
        fn, mode, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes,
        reverse)
    x = _contig(input)
    if N == 0:
        # Empty batch (torch accepts it): nothing to run; the kernels get no null pointers.
        return (_empty(x, tuple(input.shape[:-1]) + (R,)), _empty(x, (B, R)),
                _empty(x, (B, H)) if mode == LSTM else None,
                _empty_acc(x, (0,)) if training else None)
    y = _empty(x, tuple(input.shape[:-1]) + (R,))
    hn = _empty(x, (B, R))
    cn = _empty(x, (B, H)) if mode == LSTM else None
    ws = None
    if training:
        ws_n, _ = _C.rnn_buffer_sizes(geometry, device >= 0)
        ws = _empty_acc(x, (ws_n,))
    # CUDA: the step's recurrent product (and, in inference, the input projection; for
    # float16/bfloat16 tensors, float32 copies of operands and results) live in a scratch from
    # the caller's allocator (torch's caching allocator for CUDA tensors).
    scratch = (_empty_acc(x, (_C.rnn_cuda_forward_scratch_size(geometry, bool(training)),))
               if device >= 0 else None)
    # Contiguous operands stay referenced here until the call returns (a torch pointer is an int).
    args = [x] + [_contig(v) for v in (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, hx, cx)]
    args += [y, hn, cn, ws, scratch]
    _C.rnn_forward(geometry, *_pointers(args), device, _tensor.current_stream(device))
    return y, hn, cn, ws


def recurrent_layer_backward(mode, grad_output, grad_hn, input, hx, weight_ih, weight_hh, workspace, *,
                       grad_cn=None, cx=None, weight_hr=None, has_bias=True, batch_sizes=None,
                       reverse=False, needs_input_grad=True, needs_weight_grad=True):
    """Gradients of rnn_layer_forward from its workspace. grad_output (shape of the output),
    grad_hn, grad_cn may be None (zeros). Returns (grad_input, grad_hx, grad_cx, grad_weight_ih,
    grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_weight_hr); entries not wanted (or without a
    parameter) are None. hx and cx give the shapes only (the workspace holds the states)."""
    fn = _NAMES[mode] + "_layer_backward"
    geometry, code, device, (T, B, N, I, H, R), bs = _geometry(
        fn, mode, input, hx, cx, weight_ih, weight_hh, None, None, weight_hr, batch_sizes, reverse)
    geometry = geometry[:9] + (bool(has_bias),)
    ws_n, sc_n = (0, 0) if N == 0 else _C.rnn_buffer_sizes(geometry, device >= 0)
    if (workspace is None or tuple(workspace.shape) != (ws_n,)
            or _tensor.kind(workspace) != _tensor.kind(input)
            or workspace.dtype != workspace_dtype(input)):
        raise RuntimeError(f"{fn}: expected the forward's workspace of {ws_n} elements of "
                           f"{workspace_dtype(input)} (run the forward with training=True), got "
                           f"{'None' if workspace is None else _tensor.describe(workspace)}")
    for name, g, shape in (("grad_output", grad_output, tuple(input.shape[:-1]) + (R,)),
                           ("grad_hn", grad_hn, (B, R)), ("grad_cn", grad_cn, (B, H))):
        if g is not None and tuple(g.shape) != shape:
            raise RuntimeError(f"{fn}: expected {name} of shape {shape}, got "
                               f"{_tensor.describe(g)}")
    check_operands(fn, {"input": input,
                        **{k: v for k, v in (("grad_output", grad_output), ("grad_hn", grad_hn),
                                             ("grad_cn", grad_cn)) if v is not None}},
                   cuda_half=True)
    if _tensor.kind(workspace) == "torch" and workspace.device != input.device:
        raise RuntimeError(f"{fn}: expected all tensors to be on the same device, but workspace "
                           f"is on {workspace.device} and input on {input.device}")
    x = _contig(input)
    dx = _empty(x, tuple(input.shape)) if needs_input_grad else None
    dh0 = _empty(x, (B, R))
    dc0 = _empty(x, (B, H)) if mode == LSTM else None
    dw = needs_weight_grad
    dw_ih = _empty(x, tuple(weight_ih.shape)) if dw else None
    dw_hh = _empty(x, tuple(weight_hh.shape)) if dw else None
    db_ih = _empty(x, (weight_ih.shape[0],)) if dw and has_bias else None
    db_hh = _empty(x, (weight_ih.shape[0],)) if dw and has_bias else None
    dw_hr = _empty(x, tuple(weight_hr.shape)) if dw and weight_hr is not None else None
    if N == 0:
        # Empty batch: empty input/state gradients, zero parameter gradients (as torch).
        for g in (dw_ih, dw_hh, db_ih, db_hh, dw_hr):
            if g is not None:
                g[...] = 0
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr
    scratch = _empty_acc(x, (sc_n,))
    operands = [x] + [_contig(v) for v in (weight_ih, weight_hh, weight_hr, grad_output, grad_hn,
                                           grad_cn, workspace)]
    backward_kernel(geometry, device, *operands, scratch,
                    (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr))
    return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr


def backward_kernel(geometry, device, x, w_ih, w_hh, w_hr, grad_output, grad_hn, grad_cn,
                    workspace, scratch, outs):
    """The backward kernel call on operands checked against geometry (recurrent_layer_backward,
    and the modules' fast path with its cached geometry): contiguous arrays/tensors or None;
    outs = (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr), None where not wanted (dh0 always,
    dc0 for LSTM)."""
    args = [x, w_ih, w_hh, w_hr, grad_output, grad_hn, grad_cn, workspace, scratch, *outs]
    _C.rnn_backward(geometry, *_pointers(args), device, _tensor.current_stream(device))


# ---- typed wrappers: sequences -------------------------------------------------------------------

def lstm_layer_forward(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None,
                       weight_hr=None, *, batch_sizes=None, reverse=False, training=True):
    """One LSTM layer and direction (torch.nn.LSTM's per-layer math). input (T, B, I) or packed
    (N, I) with batch_sizes; hx (B, R), cx (B, H). Returns (output, h_n, c_n, workspace).

    >>> y, hn, cn, ws = fastdl.ops.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    """
    return recurrent_layer_forward(LSTM, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, cx=cx,
                             weight_hr=weight_hr, batch_sizes=batch_sizes, reverse=reverse,
                             training=training)


def lstm_layer_backward(grad_output, grad_hn, grad_cn, input, hx, cx, weight_ih, weight_hh,
                        workspace, weight_hr=None, *, has_bias=True, batch_sizes=None,
                        reverse=False):
    """Gradients of lstm_layer_forward: (grad_input, grad_hx, grad_cx, grad_weight_ih,
    grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_weight_hr).

    >>> gx, gh, gc, gwi, gwh, gbi, gbh, _ = fastdl.ops.lstm_layer_backward(gy, None, None, x, h0,
    ...     c0, w_ih, w_hh, ws)
    """
    return recurrent_layer_backward(LSTM, grad_output, grad_hn, input, hx, weight_ih, weight_hh,
                              workspace, grad_cn=grad_cn, cx=cx, weight_hr=weight_hr,
                              has_bias=has_bias, batch_sizes=batch_sizes, reverse=reverse)


def gru_layer_forward(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *,
                      batch_sizes=None, reverse=False, training=True):
    """One GRU layer and direction (torch.nn.GRU's per-layer math). Returns (output, h_n,
    workspace).

    >>> y, hn, ws = fastdl.ops.gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    """
    y, hn, _, ws = recurrent_layer_forward(GRU, input, hx, weight_ih, weight_hh, bias_ih, bias_hh,
                                     batch_sizes=batch_sizes, reverse=reverse, training=training)
    return y, hn, ws


def gru_layer_backward(grad_output, grad_hn, input, hx, weight_ih, weight_hh, workspace, *,
                       has_bias=True, batch_sizes=None, reverse=False):
    """Gradients of gru_layer_forward: (grad_input, grad_hx, grad_weight_ih, grad_weight_hh,
    grad_bias_ih, grad_bias_hh).

    >>> gx, gh, gwi, gwh, gbi, gbh = fastdl.ops.gru_layer_backward(gy, None, x, h0, w_ih, w_hh, ws)
    """
    g = recurrent_layer_backward(GRU, grad_output, grad_hn, input, hx, weight_ih, weight_hh, workspace,
                           has_bias=has_bias, batch_sizes=batch_sizes, reverse=reverse)
    return g[0], g[1], g[3], g[4], g[5], g[6]


def rnn_layer_forward(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *,
                        nonlinearity="tanh", batch_sizes=None, reverse=False, training=True):
    """One Elman RNN layer and direction (torch.nn.RNN, 'tanh' or 'relu'). Returns (output, h_n,
    workspace).

    >>> y, hn, ws = fastdl.ops.rnn_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    """
    y, hn, _, ws = recurrent_layer_forward(_mode_of(nonlinearity), input, hx, weight_ih, weight_hh,
                                     bias_ih, bias_hh, batch_sizes=batch_sizes, reverse=reverse,
                                     training=training)
    return y, hn, ws


def rnn_layer_backward(grad_output, grad_hn, input, hx, weight_ih, weight_hh, workspace, *,
                         nonlinearity="tanh", has_bias=True, batch_sizes=None, reverse=False):
    """Gradients of rnn_layer_forward: (grad_input, grad_hx, grad_weight_ih, grad_weight_hh,
    grad_bias_ih, grad_bias_hh).

    >>> gx, gh, gwi, gwh, gbi, gbh = fastdl.ops.rnn_layer_backward(gy, None, x, h0, w_ih, w_hh,
    ...     ws)
    """
    g = recurrent_layer_backward(_mode_of(nonlinearity), grad_output, grad_hn, input, hx, weight_ih,
                           weight_hh, workspace, has_bias=has_bias, batch_sizes=batch_sizes,
                           reverse=reverse)
    return g[0], g[1], g[3], g[4], g[5], g[6]


# ---- cells on the CPU: one step, weights read in place (csrc/cpu/rnn_cell.cpp) ------------------
# Internal entry points of fastdl.nn's cells (nn/functional/rnn.py run_cell) and of the custom op
# fastdl::recurrent_cell (_library), which reach them without the module's checks when traced or
# called directly: both functions check every operand (a few attribute compares per call) before
# the kernels read raw memory; run_cell, for the modules, has checked x, h and c itself and made
# every operand contiguous, so it has cell_cpu_forward check the weights' dtype, device, layout
# and shape only (states_checked). A one-step layer call packs W_hh and projects the input in a
# separate GEMM: at (64, 128, 32) that fixed cost was ~60 us of a ~120 us step.

def cell_cpu_supported(x, weights):
    """Whether cell_cpu_forward serves these torch operands: CPU tensors (not the emulated CUDA
    device), float32 or float64, strided, every size >= 1."""
    torch = sys.modules.get("torch")
    if torch is None or _tensor.CPU_DEVICE >= 0 or not x.is_cpu or x.layout is not torch.strided:
        return False
    if x.dtype is not torch.float32 and x.dtype is not torch.float64:
        return False
    return x.numel() > 0 and weights[1].numel() > 0


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _empty_like(t):
    return sys.modules["torch"].empty_like(t)


def _check_cell(fn, operands, contiguous=True):
    """operands: (argument, tensor or None, expected shape) triples, the input first. Every
    tensor a strided CPU tensor of the input's dtype (float32 or float64) with its shape, and
    (contiguous=True) contiguous without a negative bit. Returns the dtype code. RuntimeError
    (TypeError for the dtype family) naming the argument. Identity and tuple compares only: the
    module path pays this on every step (~3 us for an LSTM cell's 7 operands)."""
    torch = sys.modules["torch"]
    x = operands[0][1]
    dtype = x.dtype
    if dtype is not torch.float32 and dtype is not torch.float64:
        raise TypeError(f"{fn}: the CPU cell kernels take float32 or float64, got input of "
                        f"{dtype}")
    strided = torch.strided
    for name, t, shape in operands:
        if t is None:
            continue
        if not t.is_cpu or t.dtype is not dtype or t.layout is not strided:
            raise RuntimeError(f"{fn}: expected {name} as a {dtype} CPU tensor like the input, "
                               f"got {_tensor.describe(t)}")
        if t.shape != shape:
            raise RuntimeError(f"{fn}: expected {name} of shape {shape}, got "
                               f"{_tensor.describe(t)}")
        if contiguous and (not t.is_contiguous() or t.is_neg()):
            raise RuntimeError(f"{fn}: expected {name} contiguous (fastdl internal)")
    return _tensor.FLOAT32 if dtype is torch.float32 else _tensor.FLOAT64


def _cell_shapes(mode, x, h, w_ih):
    """(B, I, H, G*H) from the operands that set them, checked for rank first."""
    fn = "recurrent_cell"
    for name, t in (("input", x), ("hx", h), ("weight_ih", w_ih)):
        if t.ndim != 2:
            raise RuntimeError(f"{fn}: expected {name} with 2 dims, got {_tensor.describe(t)}")
    B, I = x.shape
    H = h.shape[1]
    return B, I, H, _GATES[mode] * H


def check_cell_forward(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, contiguous=True):
    """cell_cpu_forward's checks (also the custom op's fake, with contiguous=False: the real op
    makes its operands contiguous first). Returns (B, I, H, G*H, dtype code)."""
    if mode not in _GATES:
        raise ValueError(f"recurrent_cell: unknown mode {mode}")
    B, I, H, GH = _cell_shapes(mode, x, h, w_ih)
    if (c is not None) != (mode == LSTM) or (b_ih is None) != (b_hh is None):
        raise RuntimeError("recurrent_cell: expected cx exactly for LSTM, and both biases or "
                           "neither")
    BH = (B, H)
    code = _check_cell("recurrent_cell",
                       (("input", x, (B, I)), ("hx", h, BH), ("cx", c, BH),
                        ("weight_ih", w_ih, (GH, I)), ("weight_hh", w_hh, (GH, H)),
                        ("bias_ih", b_ih, (GH,)), ("bias_hh", b_hh, (GH,))), contiguous)
    return B, I, H, GH, code


def cell_cpu_forward(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, training, *, states_checked=False):
    """x (B, I), h (B, H), c (B, H) (LSTM, else None), weights in torch's layout, contiguous
    (callers make them so: _tensor.contiguous), on the CPU (cell_cpu_supported). Returns (h',
    c' or None, activations (B, 4H) for the backward when training and LSTM/GRU, else None).
    states_checked: the caller (nn/functional/rnn.py run_cell, for the cell modules) has already
    checked the mode, x, h and c (rank, shapes, dtype, device, layout, contiguity), so only the
    weights are checked here (a second full check is ~40 attribute reads per step: RESULTS.md,
    2026-12-05 11:05)."""
    if states_checked:
        B, I = x.shape
        H = h.shape[1]
        GH = _GATES[mode] * H
        code = _check_cell("recurrent_cell",
                           (("input", x, (B, I)), ("weight_ih", w_ih, (GH, I)),
                            ("weight_hh", w_hh, (GH, H)), ("bias_ih", b_ih, (GH,)),
                            ("bias_hh", b_hh, (GH,))), contiguous=False)
        if (c is not None) != (mode == LSTM) or (b_ih is None) != (b_hh is None):
            raise RuntimeError("recurrent_cell: expected cx exactly for LSTM, and both biases or "
                               "neither")
    else:
        B, I, H, GH, code = check_cell_forward(mode, x, h, c, w_ih, w_hh, b_ih, b_hh)
    lstm = mode == LSTM
    if B == 0 or I == 0 or H == 0:
        raise RuntimeError("recurrent_cell: the CPU cell kernels take sizes >= 1 (fastdl "
                           "internal: run_cell sends empty sizes to the layer kernels)")
    h_new = _empty_like(h)     # h is contiguous (checked, or made so by run_cell): so are these
    c_new = _empty_like(h) if lstm else None
    act = x.new_empty((B, 4 * H)) if training and (lstm or mode == GRU) else None
    _C.rnn_cell_forward(mode, code, B, I, H, x.data_ptr(), h.data_ptr(), _ptr(c),
                        w_ih.data_ptr(), w_hh.data_ptr(), _ptr(b_ih), _ptr(b_hh),
                        h_new.data_ptr(), _ptr(c_new), _ptr(act))
    return h_new, c_new, act


def as_saved(t, dtype, shape) -> bool:
    """Whether t is what a backward reads by pointer from what its forward saved: a dense,
    contiguous CPU tensor of dtype and shape, its memory holding its values (no negative bit, not
    a ZeroTensor, whose pointer is null). A saved-tensor hook may hand back any tensor; torch
    does not check it."""
    torch = sys.modules["torch"]
    return (t.dtype is dtype and t.shape == shape and t.is_cpu and t.layout is torch.strided
            and t.is_contiguous() and not t.is_neg() and not t._is_zerotensor())


def cell_cpu_backward(mode, grad_h, grad_c, x, h, c, h_new, c_new, act, w_ih, w_hh, needs, *,
                      forward_sizes=None):
    """Gradients of cell_cpu_forward from what it saved: grad_h, grad_c (LSTM) may be None
    (zero). needs: (input, hx, cx, weight_ih, weight_hh, bias) flags. Returns (grad_input,
    grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh), None where not
    needed. The saved operands must be contiguous (as cell_cpu_forward's); the gradients may not
    be. forward_sizes: (dtype, B, I, H) of the forward when the caller is the cells' autograd
    Function (nn/functional/rnn.py _Cell), whose gradients autograd's engine checked
    (grad_operand): each saved operand is then only checked to be as_saved against them. If one
    is not (a saved-tensor hook handed back another tensor), all are made contiguous and get the
    full checks, and sizes other than the forward's raise."""
    lstm, gated = mode == LSTM, mode in (LSTM, GRU)
    checked = False
    if forward_sizes is not None:
        dt, B, I, H = forward_sizes
        GH = _GATES[mode] * H
        BH = (B, H)
        checked = (not lstm or (c is not None and c_new is not None)) and (
            act is not None if gated else h_new is not None)
        for t, shape in ((x, (B, I)), (h, BH), (c, BH), (c_new, BH), (h_new, BH),
                         (act, (B, 4 * H)), (w_ih, (GH, I)), (w_hh, (GH, H))):
            if t is not None and not as_saved(t, dt, shape):
                checked = False
                break
        if checked:
            grad_h, grad_c = grad_operand(grad_h), grad_operand(grad_c)
            code = _tensor.FLOAT32 if dt is sys.modules["torch"].float32 else _tensor.FLOAT64
        else:   # (a hook's strided or negative-bit copy is read resolved and contiguous)
            x, h, c, h_new, c_new, act, w_ih, w_hh = (
                _contig(t) for t in (x, h, c, h_new, c_new, act, w_ih, w_hh))
    if not checked:
        if mode not in _GATES:
            raise ValueError(f"recurrent_cell_backward: unknown mode {mode}")
        grad_h = None if grad_h is None else _tensor.contiguous(grad_h)
        grad_c = None if grad_c is None else _tensor.contiguous(grad_c)
        B, I, H, GH = _cell_shapes(mode, x, h, w_ih)
        if forward_sizes is not None and (x.dtype, B, I, H) != tuple(forward_sizes):
            raise RuntimeError(f"recurrent_cell_backward: a saved tensor came back from a "
                               f"saved-tensor hook with other sizes than the forward's (batch, "
                               f"input, hidden) {tuple(forward_sizes[1:])} {forward_sizes[0]}")
        # what the kernels read: LSTM c, c', act; GRU act; Elman h'
        if (lstm and (c is None or c_new is None)) or (gated and act is None) or \
                (not gated and h_new is None):
            raise RuntimeError("recurrent_cell_backward: expected the forward's saved tensors "
                               "(cx and c' for LSTM, the activations for LSTM/GRU, h' for RNN)")
        BH = (B, H)
        code = _check_cell("recurrent_cell_backward",
                           (("input", x, (B, I)), ("hx", h, BH), ("cx", c if lstm else None, BH),
                            ("c_new", c_new if lstm else None, BH),
                            ("h_new", None if gated else h_new, BH),
                            ("activations", act if gated else None, (B, 4 * H)),
                            ("weight_ih", w_ih, (GH, I)), ("weight_hh", w_hh, (GH, H)),
                            ("grad_h", grad_h, BH), ("grad_c", grad_c if lstm else None, BH)))
    outs = (x.new_empty((B, I)) if needs[0] else None,
            x.new_empty((B, H)) if needs[1] else None,
            x.new_empty((B, H)) if needs[2] and lstm else None,
            x.new_empty((GH, I)) if needs[3] else None,
            x.new_empty((GH, H)) if needs[4] else None,
            x.new_empty((GH,)) if needs[5] else None,
            x.new_empty((GH,)) if needs[5] else None)
    _C.rnn_cell_backward(
        mode, code, B, I, H,
        (x.data_ptr(), h.data_ptr(), _ptr(c) if lstm else 0, _ptr(c_new) if lstm else 0,
         0 if gated else h_new.data_ptr(), w_ih.data_ptr(), w_hh.data_ptr(),
         act.data_ptr() if gated else 0),
        (_ptr(grad_h), _ptr(grad_c) if lstm else 0), tuple(_ptr(t) for t in outs))
    return outs


# ---- cells: one step of a layer --------------------------------------------------------------------

def _step(x):
    return x.reshape((1,) + tuple(x.shape))


def lstm_cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *,
                      training=True):
    """torch.nn.LSTMCell's step: input (B, I), hx (B, H), cx (B, H). Returns (h', c', workspace).

    >>> h1, c1, ws = fastdl.ops.lstm_cell_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    """
    y, hn, cn, ws = recurrent_layer_forward(LSTM, _step(input), hx, weight_ih, weight_hh, bias_ih,
                                      bias_hh, cx=cx, training=training)
    return hn, cn, ws


def lstm_cell_backward(grad_h, grad_c, input, hx, cx, weight_ih, weight_hh, workspace, *,
                       has_bias=True):
    """Gradients of lstm_cell_forward (grad_h, grad_c may be None): (grad_input, grad_hx, grad_cx,
    grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh).

    >>> gx, gh, gc, gwi, gwh, gbi, gbh = fastdl.ops.lstm_cell_backward(gh1, gc1, x, h0, c0, w_ih,
    ...     w_hh, ws)
    """
    g = recurrent_layer_backward(LSTM, None, grad_h, _step(input), hx, weight_ih, weight_hh, workspace,
                           grad_cn=grad_c, cx=cx, has_bias=has_bias)
    return (g[0].reshape(tuple(input.shape)),) + tuple(g[1:7])


def gru_cell_forward(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *,
                     training=True):
    """torch.nn.GRUCell's step: input (B, I), hx (B, H). Returns (h', workspace).

    >>> h1, ws = fastdl.ops.gru_cell_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    """
    _, hn, _, ws = recurrent_layer_forward(GRU, _step(input), hx, weight_ih, weight_hh, bias_ih,
                                     bias_hh, training=training)
    return hn, ws


def gru_cell_backward(grad_h, input, hx, weight_ih, weight_hh, workspace, *, has_bias=True):
    """Gradients of gru_cell_forward: (grad_input, grad_hx, grad_weight_ih, grad_weight_hh,
    grad_bias_ih, grad_bias_hh).

    >>> gx, gh, gwi, gwh, gbi, gbh = fastdl.ops.gru_cell_backward(gh1, x, h0, w_ih, w_hh, ws)
    """
    g = recurrent_layer_backward(GRU, None, grad_h, _step(input), hx, weight_ih, weight_hh, workspace,
                           has_bias=has_bias)
    return g[0].reshape(tuple(input.shape)), g[1], g[3], g[4], g[5], g[6]


def rnn_cell_forward(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *,
                     nonlinearity="tanh", training=True):
    """torch.nn.RNNCell's step ('tanh' or 'relu'). Returns (h', workspace).

    >>> h1, ws = fastdl.ops.rnn_cell_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    """
    _, hn, _, ws = recurrent_layer_forward(_mode_of(nonlinearity), _step(input), hx, weight_ih,
                                     weight_hh, bias_ih, bias_hh, training=training)
    return hn, ws


def rnn_cell_backward(grad_h, input, hx, weight_ih, weight_hh, workspace, *, nonlinearity="tanh",
                      has_bias=True):
    """Gradients of rnn_cell_forward: (grad_input, grad_hx, grad_weight_ih, grad_weight_hh,
    grad_bias_ih, grad_bias_hh).

    >>> gx, gh, gwi, gwh, gbi, gbh = fastdl.ops.rnn_cell_backward(gh1, x, h0, w_ih, w_hh, ws)
    """
    g = recurrent_layer_backward(_mode_of(nonlinearity), None, grad_h, _step(input), hx, weight_ih,
                           weight_hh, workspace, has_bias=has_bias)
    return g[0].reshape(tuple(input.shape)), g[1], g[3], g[4], g[5], g[6]
