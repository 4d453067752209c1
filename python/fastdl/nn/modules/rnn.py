"""torch.nn.RNN, LSTM, GRU and RNNCell, LSTMCell, GRUCell computed by fastdl's recurrent kernels.

Each class derives from its torch counterpart, so the constructor, parameter names
(weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, weight_hr_l0, ..._reverse), shapes, gate
order, initialisation, repr, state_dict layout and torch's own argument checks
(check_forward_args, permute_hidden) are torch's; forward runs fastdl.ops.recurrent_layer_* through
fastdl.nn.functional.rnn's autograd instead of torch's _VF kernels. Under a torch.func transform
(grad, jacrev, jvp, vmap), with a forward-AD tangent on the input, a state or a parameter, or
under torch.autocast for the input's device type, forward is torch's own (torch's result; under
vmap, torch's error: torch has no batching rule for its recurrent ops).

>>> lstm = fastdl.nn.LSTM(10, 20, num_layers=2, batch_first=True)
>>> lstm.load_state_dict(torch.nn.LSTM(10, 20, num_layers=2).state_dict())
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ... import _C, _library, _tensor
from ...ops import rnn as _ops_rnn
from ..functional import rnn as _f
from ..functional._autocast import any_autocast as _any_autocast, autocast_on as _autocast_on
from ..functional.pool import _eager
from ._script import NotScriptable

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]


def _torch_computes(module, input, *states) -> bool:
    """Whether torch's own forward must compute this call (fastdl._library.route: a torch.func
    transform, a forward-AD tangent on input, states or parameters, a meta input, or an input
    that is not floating point; or
    torch.autocast on for the input's device type: torch's autocast casts differently per layer
    and device, see fastdl.nn.functional._autocast)."""
    if _library._functorch_level() is None and _library._fwad._current_level < 0:
        data = input.data if isinstance(input, PackedSequence) else input
        if not isinstance(data, torch.Tensor):
            return False   # (fastdl's forward raises the TypeError)
        if data.is_meta or not data.is_floating_point():
            # torch's forward gives the shapes; integer, bool, complex: torch's forward computes
            # or raises (route says TORCH for both too)
            return True
        # route cannot say TORCH now: skip gathering the parameters (per cell step)
        return _any_autocast() and _autocast_on(data)
    data = input.data if isinstance(input, PackedSequence) else input
    if not isinstance(data, torch.Tensor):
        return False   # (fastdl's forward raises the TypeError)
    if _any_autocast() and _autocast_on(data):
        return True
    flat = []
    for s in states:
        flat.extend(t for t in (s if isinstance(s, (tuple, list)) else (s,))
                    if isinstance(t, torch.Tensor))   # (anything else: fastdl's checks raise)
    params = [getattr(module, n) for n in module._flat_weights_names] if hasattr(
        module, "_flat_weights_names") else list(module.parameters())
    return _library.route(data, *flat, *params) == _library.TORCH


class _NotATensorError(TypeError, AttributeError):
    """An input that is not a Tensor (or PackedSequence): a TypeError with fastdl's message, and an
    AttributeError, the class torch's recurrent modules and cells raise there (from input.dim()),
    so code catching either works with both libraries."""


def _check_kind(name, input, weight):
    if not isinstance(input, (torch.Tensor, PackedSequence)):
        raise _NotATensorError(f"{name}: expected input to be a Tensor or PackedSequence, got "
                               f"{type(input).__name__}")
    data = input.data if isinstance(input, PackedSequence) else input
    if data.device != weight.device:
        raise RuntimeError(f"{name}: expected input and parameters on the same device, got input "
                           f"on {data.device} and parameters on {weight.device}")


# ---- fast path (inference and training) -----------------------------------------------------------
# A one-layer, one-direction module without projection, called on a plain contiguous time-major
# CPU tensor without a state or with plain contiguous states of shape (1, B, H) of the input's
# dtype (_fast_states) (_eager: outside torch.compile / export,
# jit.trace, dispatch modes, torch.func and forward AD; and no torch function mode such as
# `with torch.device(...)` / set_default_device), whose weights are plain contiguous CPU tensors
# of the input's dtype, goes straight to the kernel. What the kernel call needs besides the
# sequence length and batch is cached under (mode, dtype, input_size, hidden_size, the input's
# feature size, the weights' shapes), stored only after the general path ran a call with that
# key: every error the general path raises depends on the key alone (or on an empty input, which
# never takes the fast path), so errors stay the general path's. A hit runs the same kernel on the
# same operands (zero states on the input's device, outputs of the general path's shapes and
# layout), so results are bitwise the same (tests/test_rnn.py::test_inference_fast_path). The
# general path's Python (module checks, run_layers, the operands' validation, contiguous copies,
# stacking) was about a third of a batch-1 LSTM call (benchmarks/RESULTS.md, 2026-12-02 00:50).
# With grad mode on and a gradient wanted (input, a state or a weight requires it), outside
# saved-tensor hooks (_fast_forward), a hit runs _FastLayer: the same forward kernel with the
# workspace saved, and a backward that calls the backward kernel with the cached geometry (the
# general path re-validated every operand there, and materialised zero gradients for unused
# outputs, which the kernel takes as absent). Tested by tests/test_rnn.py::
# test_training_fast_path; measured in RESULTS.md, 2026-12-05 20:05 section.
_FAST: dict = {}
_FAST_MAX = 256
_Tensor, _Parameter = torch.Tensor, nn.Parameter
_grad_enabled = torch.is_grad_enabled
_function_modes = torch._C._len_torch_function_stack
_zeros, _empty = torch.zeros, torch.empty
_DTYPES = {_tensor.FLOAT32: torch.float32, _tensor.FLOAT64: torch.float64}


def _fast_operands(module, input):
    """(key, weights) when this call may take the fast path, else None."""
    if (module.num_layers != 1 or module.bidirectional or module.proj_size or module.batch_first
            or _function_modes() or not _eager(input) or input.dim() != 3
            or input.numel() == 0 or _any_autocast()):
        return None
    dt = input.dtype
    key = [module._fastdl_mode(), dt, module.input_size, module.hidden_size, input.shape[2]]
    weights = []
    for n in module._flat_weights_names:
        w = getattr(module, n)
        t = type(w)
        if ((t is not _Parameter and t is not _Tensor) or w.dtype is not dt or not w.is_cpu
                or not w.is_contiguous() or w.is_neg() or w._is_zerotensor()):
            return None
        key.append(w.shape)
        weights.append(w)
    return tuple(key), weights


def _fast_put(key, input, weights):
    """Caches the kernel geometry for key after the general path ran this call (so its operands
    passed the checks). Never raises: a failure only leaves the key uncached."""
    mode = key[0]
    lstm = mode == _f.LSTM
    if key[1] is not torch.float32 and key[1] is not torch.float64:
        return   # (CPU half precision: the general path, in float32, nn/functional/_half.py)
    try:
        h0 = _zeros((input.shape[1], key[3]), dtype=input.dtype, device=input.device)
        b_ih, b_hh = (weights[2], weights[3]) if len(weights) == 4 else (None, None)
        geometry, _, device, _, _ = _ops_rnn._geometry(
            "fast path", mode, input, h0, h0 if lstm else None, weights[0], weights[1], b_ih,
            b_hh, None, None, False)
    except Exception:   # (not expected: the general path accepted these operands)
        return
    if len(_FAST) >= _FAST_MAX:
        _FAST.clear()
    _FAST[key] = (geometry, lstm, key[3], device)


def _fast_states(hx, lstm, input, H):
    """(h0, c0 or None) when the state hx the user passed may take the fast path: for the LSTM a
    tuple of two, each a plain contiguous CPU tensor of the input's dtype and shape (1, B, H);
    else None, and the general path checks it (and raises its errors)."""
    if lstm:
        if type(hx) is not tuple or len(hx) != 2:
            return None
        states = hx
    else:
        states = (hx,)
    shape = (1, input.shape[1], H)
    for t in states:
        if (type(t) is not _Tensor and type(t) is not _Parameter) or t.dtype is not input.dtype \
                or not t.is_cpu or t.shape != shape or not t.is_contiguous() or t.is_neg() \
                or t._is_zerotensor():
            return None
    return (hx[0], hx[1]) if lstm else (hx, None)


def _fast_run(input, h0, c0, weights, geo, training):
    """The forward kernel call of the general path for this input (time-major) and states h0,
    c0 (1, B, H) (None: zeros), with the operands _fast_operands / _fast_states checked: (y, hn,
    cn or None, workspace or None, geometry). geometry: (mode, dtype code, T, B, batch_sizes, I,
    H, P, reverse, has_bias); T and B are this call's. training: the workspace the backward
    reads is filled."""
    geometry, lstm, H, device = geo
    T, B = input.shape[0], input.shape[1]
    geometry = geometry[:2] + (T, B) + geometry[4:]
    dt, dev = input.dtype, input.device
    if h0 is None:
        h0 = _zeros((B, H), dtype=dt, device=dev)
        c0 = h0 if lstm else None
    y = _empty((T, B, H), dtype=dt, device=dev)
    hn = _empty((1, B, H), dtype=dt, device=dev)
    cn = _empty((1, B, H), dtype=dt, device=dev) if lstm else None
    ws = (_empty((_C.rnn_buffer_sizes(geometry, False)[0],), dtype=dt, device=dev)
          if training else None)
    w = weights
    bias = (w[2].data_ptr(), w[3].data_ptr()) if len(w) == 4 else (None, None)
    _C.rnn_forward(geometry, input.data_ptr(), w[0].data_ptr(), w[1].data_ptr(), *bias, None,
                   h0.data_ptr(), c0.data_ptr() if lstm else None, y.data_ptr(), hn.data_ptr(),
                   cn.data_ptr() if lstm else None, None if ws is None else ws.data_ptr(), None,
                   device, 0)
    return y, hn, cn, ws, geometry


def _fast_forward(input, h0, c0, weights, geo):
    """The fast path's result, as the module returns it (None: take the general path):
    inference, or _FastLayer when a gradient is wanted (grad mode on and the input, a state or a
    weight requiring it), except under saved-tensor hooks (torch.utils.checkpoint, save_on_cpu):
    a checkpoint's recomputation must save the same tensors as its first run, which may have
    been the general path's, before this key was cached."""
    if _library.needs_autograd(input, h0, c0, *weights):
        if _f.saved_hooks_active():
            return None
        out = _FastLayer.apply(geo, input, h0, c0, *weights)
        return (out[0], (out[1], out[2])) if geo[1] else out
    y, hn, cn, _, _ = _fast_run(input, h0, c0, weights, geo, False)
    return (y, (hn, cn)) if geo[1] else (y, hn)


def _saved(t, dtype, shape):
    """A tensor _FastLayer saved, as its backward reads it (_ops_rnn.as_saved). A saved-tensor
    hook registered on the node may hand back another tensor: a strided, negative-bit or zero
    copy of the right dtype and shape is resolved into a plain contiguous one, anything else
    raises."""
    if _ops_rnn.as_saved(t, dtype, shape):
        return t
    if t.dtype is not dtype or t.shape != shape or not t.is_cpu or t.layout is not torch.strided:
        raise RuntimeError(f"fastdl recurrent layer backward: a saved tensor came back from a "
                           f"saved-tensor hook as {tuple(t.shape)} {t.dtype} {t.layout} on "
                           f"{t.device}, expected {tuple(shape)} {dtype} {torch.strided} on cpu")
    return _ops_rnn._contig(t)


class _FastLayer(torch.autograd.Function):
    """The fast path's layer with a gradient: input (T, B, I), states h0, c0 (1, B, H) or None
    (zeros), weights w_ih, w_hh[, b_ih, b_hh] (checked by _fast_operands / _fast_states against a
    key the general path validated). Returns y (T, B, H), hn (1, B, H)[, cn (1, B, H)], as _Layer
    for one direction."""

    @staticmethod
    def forward(ctx, geo, input, h0, c0, *weights):
        y, hn, cn, ws, geometry = _fast_run(input, h0, c0, weights, geo, True)
        ctx.geometry, ctx.device = geometry, geo[3]
        ctx.set_materialize_grads(False)   # an unused output's gradient: None, read as zero
        # The workspace holds every step's states, h0 and c0 included; they are saved too (as
        # _Layer's are) for a backward with create_graph, which recomputes the layer. The
        # biases, which the backward kernel does not read, are kept for that as _Layer's
        # (nn/functional/rnn.py save_with_biases).
        _f.save_with_biases(ctx, (input, weights[0], weights[1], ws,
                                  *(t for t in (h0, c0) if t is not None)), weights[2:])
        ctx.shapes = [input.shape, weights[0].shape, weights[1].shape, ws.shape]
        ctx.bias_shapes = [w.shape for w in weights[2:]]
        return (y, hn, cn) if geo[1] else (y, hn)

    @staticmethod
    def backward(ctx, gy, ghn, gcn=None):
        geometry = ctx.geometry
        graph = _grad_enabled()
        saved, biases = _f.unpack_saved(ctx, graph)
        if graph:   # create_graph: torch's layer recomputed, as _Layer.backward does
            x, weights, states = saved[0], (saved[1], saved[2], *biases), saved[4:]
            lstm = geometry[0] == _f.LSTM
            if states:
                h, c = states[0], (states[1] if lstm else None)
            else:   # (no states given: zeros)
                h = x.new_zeros(1, x.shape[1], geometry[6])
                c = h if lstm else None
            return (None, *_f.recompute_backward(
                ctx.needs_input_grad[1:],
                lambda x, h, c, *w: _f.torch_layer(geometry[0], None, 1, len(w) == 4, x, h, c, w),
                (x, h, c, *weights), (gy, ghn, gcn)))
        dt = _DTYPES[geometry[1]]
        saved = [_saved(t, dt, shape) for t, shape in zip(saved[:4], ctx.shapes)]
        x, w_ih, w_hh, ws = saved
        lstm = geometry[0] == _f.LSTM
        B, H = geometry[3], geometry[6]
        needs = ctx.needs_input_grad   # (geo, input, h0, c0, *weights)
        new = lambda *shape: _empty(shape, dtype=dt)   # noqa: E731 (CPU: _eager)
        dense = _ops_rnn.grad_operand
        gy, ghn, gcn = dense(gy), dense(ghn), dense(gcn)
        dx = new(*x.shape) if needs[1] else None
        dh0 = new(1, B, H)   # (written whether wanted or not)
        dc0 = new(1, B, H) if lstm else None
        shapes = [w_ih.shape, w_hh.shape] + ctx.bias_shapes
        dw = [new(*s) for s in shapes] if any(needs[4:]) else [None] * len(shapes)
        db = (dw[2], dw[3]) if len(shapes) == 4 else (None, None)
        scratch = new(_C.rnn_buffer_sizes(geometry, False)[1])
        _ops_rnn.backward_kernel(geometry, ctx.device, x, w_ih, w_hh, None, gy, ghn,
                                 gcn, ws, scratch,
                                 (dx, dh0, dc0, dw[0], dw[1], db[0], db[1], None))
        return (None, dx, dh0 if needs[2] else None, dc0 if needs[3] else None, *dw)


class _RecurrentMixin(NotScriptable):
    """forward() shared by RNN, LSTM and GRU: torch's RNNBase.forward structure (unbatched input,
    PackedSequence with sorted/unsorted indices, default zero states, batch_first) around
    fastdl.nn.functional.rnn.run_layers; plain one-layer calls take the fast path above."""

    def _fastdl_mode(self):
        raise NotImplementedError

    def forward(self, input, hx=None):
        fast = _fast_operands(self, input) if type(input) is _Tensor else None
        if fast is not None:
            geo = _FAST.get(fast[0])
            if geo is not None:
                states = (None, None) if hx is None else _fast_states(hx, geo[1], input, geo[2])
                if states is not None:
                    out = _fast_forward(input, states[0], states[1], fast[1], geo)
                    if out is not None:
                        return out
        out = self._forward_general(input, hx)
        if fast is not None:
            _fast_put(fast[0], input, fast[1])
        return out

    def _check_args(self, input, hx, batch_sizes, lstm):
        """torch's check_forward_args. torch's LSTM leaves packed input to its kernel, whose
        errors are RuntimeError where check_input's dtype check raises ValueError."""
        if batch_sizes is None or not lstm:
            self.check_forward_args(input, hx, batch_sizes)
            return
        for i, t in enumerate(hx):
            if t.dim() < 3:   # torch's kernel reads the state's size(2)
                raise IndexError(f"{type(self).__name__}: expected hx[{i}] with 3 dims (layers * "
                                 f"directions, batch, size) for packed input, got {t.dim()} "
                                 f"(Dimension out of range)")
        try:
            self.check_forward_args(input, hx, batch_sizes)
        except ValueError as e:
            raise RuntimeError(str(e)) from None

    def _forward_general(self, input, hx=None):  # noqa: C901 (mirrors torch's branches one for one)
        if _torch_computes(self, input, hx):
            return super().forward(input, hx)
        mode = self._fastdl_mode()
        lstm = mode == _f.LSTM
        name = type(self).__name__
        weights = [getattr(self, n) for n in self._flat_weights_names]
        _check_kind(name, input, weights[0])
        dirs = 2 if self.bidirectional else 1
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        orig_input = input
        batch_sizes = sorted_indices = unsorted_indices = None
        is_batched = True
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = orig_input
            max_batch = int(batch_sizes[0]) if batch_sizes.numel() else 0
        else:
            if input.dim() not in (2, 3):
                word = "tensor " if mode in (_f.TANH, _f.RELU) else ""
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D "
                                 f"{word}instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch = input.size(0) if self.batch_first else input.size(1)
        if hx is None:
            zeros = lambda size: torch.zeros(self.num_layers * dirs, max_batch, size,  # noqa: E731
                                             dtype=input.dtype, device=input.device)
            hx = (zeros(real_hidden), zeros(self.hidden_size)) if lstm else zeros(real_hidden)
            self._check_args(input, hx, batch_sizes, lstm)
        else:
            if lstm:
                # torch indexes whatever hx is (a list works; a Tensor or a 1-tuple raises
                # IndexError or fails the rank check below), except with sorted packed input,
                # where hx reaches its kernel as given: a Tensor is a TypeError there, and more
                # than two states a RuntimeError, as for batched input (unbatched input and
                # unsorted packed input rebuild the pair, dropping a third state)
                as_given = batch_sizes is not None and sorted_indices is None
                if as_given and isinstance(hx, torch.Tensor):
                    raise TypeError(f"{name}: expected hx to be a tuple (h_0, c_0), got Tensor")
                if isinstance(hx, (tuple, list)) and (len(hx) != 2 if as_given else (
                        len(hx) > 2 and is_batched and batch_sizes is None)):
                    raise RuntimeError(f"{name}: expected hx to hold two hidden states (h_0, "
                                       f"c_0), got {len(hx)}")
                hx = (hx[0], hx[1])
            if batch_sizes is None:
                dims = [t.dim() for t in hx] if lstm else [hx.dim()]
                want = 3 if is_batched else 2
                if any(d != want for d in dims):
                    if lstm:
                        kind = "batched 3-D" if is_batched else "unbatched 2-D"
                        raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D "
                                           f"but got ({dims[0]}-D, {dims[1]}-D) tensors")
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got "
                                       f"{dims[0]}-D tensor")
                if not is_batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if lstm else hx.unsqueeze(1)
                self.check_forward_args(input, hx, batch_sizes)
            else:
                # packed: torch reorders the states' batch rows first, then checks them
                hx = self.permute_hidden(hx, sorted_indices)
                self._check_args(input, hx, batch_sizes, lstm)
        h, c = (hx[0], hx[1]) if lstm else (hx, None)
        if c is not None and c.dtype != input.dtype and input.dtype == torch.float64 and \
                c.is_floating_point():
            c = c.to(input.dtype)   # torch's float64 LSTM promotes a lower-precision cell state
        for t_name, t in (("hx", h), ("cx", c)):
            if t is not None and t.dtype != input.dtype:
                raise RuntimeError(f"{name}: expected {t_name} with dtype {input.dtype} like the "
                                   f"input, got {t.dtype}")
        x = input
        if batch_sizes is None and self.batch_first:
            x = x.transpose(0, 1)
        if (x.size(0) if batch_sizes is None else batch_sizes.numel()) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        out = _f.run_layers(mode, x, h, c, weights, num_layers=self.num_layers,
                            bidirectional=self.bidirectional, has_bias=self.bias,
                            has_proj=self.proj_size > 0, dropout=float(self.dropout),
                            training=self.training, batch_sizes=batch_sizes)
        output = out[0]
        hidden = (out[1], out[2]) if lstm else out[1]
        if isinstance(orig_input, PackedSequence):
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if lstm else hidden.squeeze(1)
        return output, self.permute_hidden(hidden, unsorted_indices)


class RNN(_RecurrentMixin, nn.RNN):
    """torch.nn.RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None) on fastdl's kernels.

    >>> rnn = fastdl.nn.RNN(10, 20, 2)
    >>> output, h_n = rnn(torch.randn(5, 3, 10), torch.randn(2, 3, 20))
    """

    def _fastdl_mode(self):
        return _f.TANH if self.nonlinearity == "tanh" else _f.RELU


class LSTM(_RecurrentMixin, nn.LSTM):
    """torch.nn.LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None) on fastdl's kernels.

    >>> lstm = fastdl.nn.LSTM(10, 20, 2)
    >>> output, (h_n, c_n) = lstm(torch.randn(5, 3, 10))
    """

    def _fastdl_mode(self):
        return _f.LSTM


class GRU(_RecurrentMixin, nn.GRU):
    """torch.nn.GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None) on fastdl's kernels.

    >>> gru = fastdl.nn.GRU(10, 20, 2)
    >>> output, h_n = gru(torch.randn(5, 3, 10))
    """

    def _fastdl_mode(self):
        return _f.GRU


# ---- cells ------------------------------------------------------------------------------------

def _cell_parameters(module):
    """(weight_ih, weight_hh, bias_ih, bias_hh) of a cell module. Read from _parameters for the
    three classes themselves (one dict look-up each, where nn.Module.__getattr__ is a Python call
    per parameter and step: RESULTS.md, 2026-12-05 11:05); any subclass, and the classes
    torch.nn.utils.parametrize derives, by attribute."""
    if type(module) in _CELL_CLASSES:
        p = module._parameters
        try:   # (a name missing there, e.g. after torch.nn.utils.weight_norm: by attribute)
            return p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"]
        except KeyError:
            pass
    return module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh


def _cell(module, mode, input, hx, cx):
    """One step (nn/functional/rnn.py run_cell): input (B, I) or (I,), hx/cx (B, H) or (H,) or None.
    torch's checks and messages (torch.nn.*Cell.forward and ATen's check_rnn_cell_forward_*).
    Written for a per-call cost of a few microseconds: cells are stepped in Python loops."""
    if not isinstance(input, torch.Tensor):
        raise _NotATensorError(f"{type(module).__name__}: expected input to be a Tensor, got "
                               f"{type(input).__name__}")
    dim = input.dim()
    if dim != 1 and dim != 2:
        raise ValueError(f"{type(module).__name__}: Expected input to be 1D or 2D, got {dim}D "
                         f"instead")
    dtype, device = input.dtype, input.device
    states = () if hx is None else (hx,) if cx is None else (hx, cx)
    for idx, v in enumerate(states):
        if v.dim() != 1 and v.dim() != 2:
            raise ValueError(f"{type(module).__name__}: Expected hx[{idx}] to be 1D or 2D, got "
                             f"{v.dim()}D instead" if mode == _f.LSTM else
                             f"{type(module).__name__}: Expected hidden to be 1D or 2D, got "
                             f"{v.dim()}D instead")
    for idx, v in enumerate(states):
        if v.dim() != dim:  # (torch's unbatched LSTMCell crashes on a 2-D state)
            if dim == 2 and v.shape[0] == input.shape[0] and \
                    input.shape[1] == module.input_size and all(
                        s.shape == (input.shape[0], module.hidden_size) for s in states[:idx]):
                # torch's cell kernels check the input's size and each earlier state, then pass
                # this state's batch check and read its size(1)
                raise IndexError(f"{type(module).__name__}: expected hx[{idx}] with 2 dims like "
                                 f"the batched input, got 1 (Dimension out of range)")
            raise RuntimeError(f"{type(module).__name__}: expected hx[{idx}] with {dim} dims like "
                               f"the input, got {v.dim()}")
    for v in states:
        if v.dtype != dtype or v.device != device:
            # A state of another dtype or device: torch's own step, which promotes an LSTM cell
            # state of another dtype and raises for the rest (the kernels read raw memory).
            if mode == _f.LSTM:
                return nn.LSTMCell.forward(module, input, (hx, cx))
            return (nn.GRUCell if mode == _f.GRU else nn.RNNCell).forward(module, input, hx)
    is_batched = dim == 2
    if not is_batched:
        input = input.unsqueeze(0)
    B = input.shape[0]
    H = module.hidden_size
    if hx is None:
        hx = torch.zeros((B, H), dtype=dtype, device=device)
        if mode == _f.LSTM:
            cx = hx
        states = ()
    elif not is_batched:
        hx = hx.unsqueeze(0)
        cx = None if cx is None else cx.unsqueeze(0)
        states = (hx,) if cx is None else (hx, cx)
    w_ih, w_hh, b_ih, b_hh = _cell_parameters(module)
    if device != w_ih.device:
        raise RuntimeError(f"{type(module).__name__}: expected input and parameters on the same "
                           f"device, got input on {device} and parameters on {w_ih.device}")
    if dtype != w_ih.dtype:
        raise RuntimeError(f"{type(module).__name__}: expected input with dtype {w_ih.dtype} like "
                           f"the parameters, got {dtype}")
    if input.shape[1] != module.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]} expected "
                           f"{module.input_size}")
    for i, t in enumerate(states):
        if t.shape[0] != B:
            raise RuntimeError(f"Input batch size {B} doesn't match hidden{i} batch size "
                               f"{t.shape[0]}")
        if t.shape[1] != H:
            raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {t.shape[1]}, "
                               f"expected {H}")
    has_bias = module.bias
    weights = [w_ih, w_hh, b_ih, b_hh] if has_bias else [w_ih, w_hh]
    out = _f.run_cell(mode, input, hx, cx, weights, has_bias=has_bias)
    if mode == _f.LSTM:
        return out if is_batched else (out[0].squeeze(0), out[1].squeeze(0))
    return out if is_batched else out.squeeze(0)


def _lstm_cell_pair(input, hx):
    """(h_0, c_0) from an LSTMCell state that is not a pair, read as torch.nn.LSTMCell.forward
    reads it: every element's rank checked (ValueError), then batched input takes only a sequence
    of exactly two tensors (a Tensor: TypeError; three: RuntimeError, from torch's lstm_cell),
    while unbatched input uses the first two."""
    if not isinstance(input, torch.Tensor) or input.dim() not in (1, 2):
        return hx[0], hx[1]   # (_cell raises the input's error)
    for idx, v in enumerate(hx):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"LSTMCell: expected hx[{idx}] to be a Tensor, got {type(v).__name__}")
        if v.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {v.dim()}D instead")
    if input.dim() == 2:
        if not isinstance(hx, (tuple, list)):
            raise TypeError(f"LSTMCell: expected hx to be a tuple of two Tensors (h_0, c_0), got "
                            f"{type(hx).__name__}")
        if len(hx) != 2:
            raise RuntimeError(f"LSTMCell: expected hx to hold two hidden states (h_0, c_0), got "
                               f"{len(hx)}")
    return hx[0], hx[1]


class RNNCell(NotScriptable, nn.RNNCell):
    """torch.nn.RNNCell(input_size, hidden_size, bias=True, nonlinearity='tanh', device=None,
    dtype=None) on fastdl's kernels.

    >>> cell = fastdl.nn.RNNCell(10, 20)
    >>> h = cell(torch.randn(3, 10), torch.randn(3, 20))
    """

    def forward(self, input, hx=None):
        if _torch_computes(self, input, hx):
            return super().forward(input, hx)
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return _cell(self, _f.TANH if self.nonlinearity == "tanh" else _f.RELU, input, hx, None)


class LSTMCell(NotScriptable, nn.LSTMCell):
    """torch.nn.LSTMCell(input_size, hidden_size, bias=True, device=None, dtype=None) on fastdl's
    kernels.

    >>> cell = fastdl.nn.LSTMCell(10, 20)
    >>> h, c = cell(torch.randn(3, 10), (torch.randn(3, 20), torch.randn(3, 20)))
    """

    def forward(self, input, hx=None):
        if _torch_computes(self, input, hx):
            return super().forward(input, hx)
        if hx is None:
            return _cell(self, _f.LSTM, input, None, None)
        if type(hx) is not tuple or len(hx) != 2:
            hx = _lstm_cell_pair(input, hx)
        return _cell(self, _f.LSTM, input, hx[0], hx[1])


class GRUCell(NotScriptable, nn.GRUCell):
    """torch.nn.GRUCell(input_size, hidden_size, bias=True, device=None, dtype=None) on fastdl's
    kernels.

    >>> cell = fastdl.nn.GRUCell(10, 20)
    >>> h = cell(torch.randn(3, 10), torch.randn(3, 20))
    """

    def forward(self, input, hx=None):
        if _torch_computes(self, input, hx):
            return super().forward(input, hx)
        return _cell(self, _f.GRU, input, hx, None)


_CELL_CLASSES = (RNNCell, LSTMCell, GRUCell)
