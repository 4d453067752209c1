"""Autograd for fastdl's recurrent layers: one torch.autograd.Function per layer (all directions)
over fastdl.ops.recurrent_layer_forward / _backward, and the multi-layer runner behind
fastdl.nn.RNN / LSTM / GRU and the cells (the equivalent of torch's _VF.lstm / _VF.gru / ...).

>>> y, hn, cn = run_layers(LSTM, x, h0, c0, weights, num_layers=2, bidirectional=True, ...)
"""
from __future__ import annotations

import contextlib

import torch

from ... import _library, _tensor
from ...ops import rnn as _ops
from ._half import HALF as _HALF, cpu_half as _cpu_half, float32 as _float32, to_dtype as _to_dtype

LSTM, GRU, TANH, RELU = _ops.LSTM, _ops.GRU, _ops.TANH, _ops.RELU
_MODES = (TANH, RELU, LSTM, GRU)


def _constant(value, choices):
    """value as the Python int among choices that equals it. torch.compile can hand the
    functions below a symbolic int for mode or the directions (the layer count too, which
    range() specialises by itself): when a graph break puts them in a frame of their own (a
    recurrent module, which dynamo refuses without torch._dynamo.config.allow_rnn) and a second
    module calls them with another value, dynamo makes that argument dynamic. They choose code,
    not sizes, so each comparison here specialises it (a guard), and the custom ops' fake
    implementations get plain ints (a symbolic mode failed there as an unhashable dict key).
    Only traced calls use it."""
    for c in choices:
        if value == c:
            return c
    return value


# what _half.cpu_half names in a mixed-dtype call: the operands after the input
_CELL_NAMES = ("hx", "cx", "weight_ih", "weight_hh", "bias_ih", "bias_hh")
_LAYER_NAMES = ("hx", "cx", "a parameter")


def _split(weights, d, per_dir, has_bias, has_proj):
    w = weights[d * per_dir:(d + 1) * per_dir]
    b_ih, b_hh = (w[2], w[3]) if has_bias else (None, None)
    return w[0], w[1], b_ih, b_hh, (w[-1] if has_proj else None)


# ---- backward with create_graph=True (double backward) ------------------------------------------
# fastdl's backward kernels are not differentiable. Under create_graph (grad mode is on in a
# Function's backward only then) a layer or cell recomputes its forward with torch's own
# recurrent ops on the saved operands, which are the ones autograd tracked, and differentiates
# that with create_graph: the gradients it returns are torch's, differentiable to any order in
# the operands and the upstream gradients (a gradient penalty, MAML). First-order backward stays
# on fastdl's kernels.

_VF = torch._VF
_TORCH_LAYERS = {LSTM: _VF.lstm, GRU: _VF.gru, TANH: _VF.rnn_tanh, RELU: _VF.rnn_relu}
_TORCH_CELLS = {LSTM: _VF.lstm_cell, GRU: _VF.gru_cell, TANH: _VF.rnn_tanh_cell,
                RELU: _VF.rnn_relu_cell}


def torch_layer(mode, batch_sizes, dirs, has_bias, x, h0, c0, weights):
    """torch's one-layer forward for _Layer's operands: (y, h_n[, c_n]) as _Layer returns."""
    fn = _TORCH_LAYERS[mode]
    hx = (h0, c0) if mode == LSTM else h0
    if batch_sizes is None:
        return fn(x, hx, list(weights), has_bias, 1, 0.0, True, dirs == 2, False)
    return fn(x, batch_sizes, hx, list(weights), has_bias, 1, 0.0, True, dirs == 2)


def torch_cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """torch's one-step cell: h' or (h', c')."""
    if mode == LSTM:
        return _VF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    return _TORCH_CELLS[mode](x, h, w_ih, w_hh, b_ih, b_hh)


def recompute_backward(needs, forward, operands, grad_outputs):
    """Gradients of forward(*operands) (a tensor or a tuple) for the operands whose `needs` is
    True (None for the others), with the graph kept (create_graph): forward is recomputed with
    grad mode on and autocast off (the Functions' forwards ran in their operands' dtype); an
    output's missing upstream gradient counts as zeros. Each operand enters the recomputation
    through its own alias (a view), so a tensor passed in two slots (states (s, s), tied weights)
    gets each slot's share of the gradient, as autograd gives each input of a Function, not the
    total twice."""
    dev = next(t for t in operands if t is not None).device.type
    off = (torch.autocast(dev, enabled=False) if torch._C._is_autocast_available(dev)
           else contextlib.nullcontext())
    with torch.enable_grad(), off:
        aliases = [None if t is None else t.view_as(t) for t in operands]
        outs = forward(*aliases)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
    wanted = [i for i, t in enumerate(operands) if t is not None and needs[i]]
    grads = [None] * len(wanted)
    if pairs and wanted:
        grads = torch.autograd.grad([o for o, _ in pairs], [aliases[i] for i in wanted],
                                    [g for _, g in pairs], create_graph=True, allow_unused=True)
    result = [None] * len(operands)
    for i, g in zip(wanted, grads):
        result[i] = torch.zeros_like(operands[i]) if g is None else g
    return result


def _bias_slots(n_weights, dirs, has_bias):
    """Positions of b_ih, b_hh in _Layer's weights (per direction: w_ih, w_hh[, b_ih, b_hh][,
    w_hr])."""
    if not has_bias:
        return set()
    per_dir = n_weights // dirs
    return {d * per_dir + k for d in range(dirs) for k in (2, 3)}


def _with_biases(others, biases, dirs, has_bias):
    """_Layer's weights again from the saved non-bias weights and the kept biases."""
    if not has_bias:
        return list(others)
    out, per_dir_others, b = [], len(others) // dirs, iter(biases)
    for d in range(dirs):
        w = others[d * per_dir_others:(d + 1) * per_dir_others]
        out += [w[0], w[1], next(b), next(b), *w[2:]]
    return out


class _Layer(torch.autograd.Function):
    """One layer, D directions. x (T, B, I) or packed (N, I); h0 (D, B, R); c0 (D, B, H) or None.
    weights: per direction w_ih, w_hh[, b_ih, b_hh][, w_hr] (torch's _flat_weights order).
    Returns y (..., D * R), h_n (D, B, R)[, c_n (D, B, H)]."""

    @staticmethod
    def forward(ctx, mode, batch_sizes, dirs, has_bias, has_proj, x, h0, c0, *weights):
        per_dir = len(weights) // dirs
        ys, hns, cns, wss = [], [], [], []
        for d in range(dirs):
            w_ih, w_hh, b_ih, b_hh, w_hr = _split(weights, d, per_dir, has_bias, has_proj)
            y, hn, cn, ws = _ops.recurrent_layer_forward(
                mode, x, h0[d], w_ih, w_hh, b_ih, b_hh, cx=None if c0 is None else c0[d],
                weight_hr=w_hr, batch_sizes=batch_sizes, reverse=d == 1, training=True)
            ys.append(y)
            hns.append(hn)
            cns.append(cn)
            wss.append(ws)
        ctx.cfg = (mode, batch_sizes, dirs, has_bias, has_proj, c0 is not None)
        # the biases are not read by the backward kernels: kept for a create_graph backward
        # only (save_with_biases)
        biased = _bias_slots(len(weights), dirs, has_bias)
        save_with_biases(ctx, (x, h0, c0, *(w for i, w in enumerate(weights) if i not in biased),
                               *wss), [weights[i] for i in sorted(biased)])
        y = ys[0] if dirs == 1 else torch.cat(ys, -1)
        hn = torch.stack(hns)
        if mode == LSTM:
            return y, hn, torch.stack(cns)
        return y, hn

    @staticmethod
    def backward(ctx, gy, ghn, gcn=None):
        if torch.is_grad_enabled():   # create_graph: torch's ops, recomputed (above)
            mode, batch_sizes, dirs, has_bias, _, _ = ctx.cfg
            saved, biases = unpack_saved(ctx, True)
            x, h0, c0 = saved[0], saved[1], saved[2]
            weights = _with_biases(saved[3:len(saved) - dirs], biases, dirs, has_bias)
            grads = recompute_backward(
                ctx.needs_input_grad[5:],
                lambda x, h0, c0, *w: torch_layer(mode, batch_sizes, dirs, has_bias, x, h0, c0,
                                                  w),
                (x, h0, c0, *weights), (gy, ghn, gcn))
            return (None, None, None, None, None, *grads)
        return _Layer._backward(ctx, gy, ghn, gcn)

    @staticmethod
    def _backward(ctx, gy, ghn, gcn):
        mode, batch_sizes, dirs, has_bias, has_proj, has_c = ctx.cfg
        saved, biases = unpack_saved(ctx, False)
        x, h0, c0 = saved[:3]
        rest = saved[3:]
        wss = rest[len(rest) - dirs:]
        weights = _with_biases(rest[:len(rest) - dirs], biases, dirs, has_bias)
        per_dir = len(weights) // dirs
        need_x = ctx.needs_input_grad[5]
        R = h0.shape[-1]
        gx = None
        gh0 = torch.empty_like(h0)
        gc0 = torch.empty_like(c0) if has_c else None
        gws = []
        for d in range(dirs):
            w_ih, w_hh, b_ih, b_hh, w_hr = _split(weights, d, per_dir, has_bias, has_proj)
            gy_d = gy if dirs == 1 else gy[..., d * R:(d + 1) * R]
            g = _ops.recurrent_layer_backward(
                mode, gy_d, ghn[d], x, h0[d], w_ih, w_hh, wss[d],
                grad_cn=None if gcn is None else gcn[d], cx=None if c0 is None else c0[d],
                weight_hr=w_hr, has_bias=has_bias, batch_sizes=batch_sizes, reverse=d == 1,
                needs_input_grad=need_x)
            if need_x:
                gx = g[0] if gx is None else gx.add_(g[0])
            gh0[d] = g[1]
            if has_c:
                gc0[d] = g[2]
            gws += [g[3], g[4]] + ([g[5], g[6]] if has_bias else []) + ([g[7]] if has_proj else [])
        return (None, None, None, None, None, gx, gh0, gc0, *gws)


def save_with_biases(ctx, tensors, biases):
    """ctx.save_for_backward(*tensors), and the biases (None entries allowed) kept for a backward
    with create_graph, the only one that reads them: outside save_for_backward, whose version
    check would make an in-place change to a bias between forward and an ordinary backward raise
    where torch's RNN / GRU layers and cells do not (checked by unpack_saved instead, on the
    create_graph path). Under saved-tensor hooks (torch.utils.checkpoint, save_on_cpu) the
    biases are saved with the rest: checkpoint recomputes them (a kept bias would be the first
    run's), and hooks turn autograd's version check off anyway."""
    ctx.n_saved = len(tensors)
    if saved_hooks_active():
        ctx.biases = None
        ctx.save_for_backward(*tensors, *biases)
    else:
        ctx.save_for_backward(*tensors)
        ctx.biases = tuple(biases)
        ctx.bias_versions = _versions(biases)


def saved_hooks_active() -> bool:
    """Whether saved-tensor hooks are active (torch.utils.checkpoint, save_on_cpu; True when this
    torch cannot tell)."""
    return _saved_hooks is None or _saved_hooks(True) is not None


_saved_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def unpack_saved(ctx, check):
    """(the tensors save_with_biases saved, the biases); check=True (the create_graph path)
    raises autograd's in-place error for a kept bias changed since the forward."""
    saved = ctx.saved_tensors
    if ctx.biases is None:
        return saved[:ctx.n_saved], saved[ctx.n_saved:]
    if check:
        now = _versions(ctx.biases)
        if now != ctx.bias_versions:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: a recurrent layer's or cell's bias is at version {now}; "
                f"expected version {ctx.bias_versions} instead (a backward with "
                "create_graph=True recomputes the forward with it)")
    return saved, ctx.biases


def _versions(tensors):
    # (an inference tensor has no version counter, and cannot be changed in place outside
    # inference mode)
    return tuple(t._version for t in tensors if t is not None and not t.is_inference())


def _cell_recompute(needs, mode, x, h, c, weights, grad_h, grad_c):
    """A cell Function's backward under create_graph: torch's cell, recomputed (above). needs:
    needs_input_grad of x, h, c and the weights (w_ih, w_hh[, b_ih, b_hh]). Returns the
    gradients of x, h, c, w_ih, w_hh, b_ih, b_hh (None where not needed or absent)."""
    pad = 4 - len(weights)
    return recompute_backward(tuple(needs) + (False,) * pad, lambda *a: torch_cell(mode, *a),
                              (x, h, c, *weights, *(None,) * pad), (grad_h, grad_c))


class _Cell(torch.autograd.Function):
    """One step of a cell on the CPU kernels: x (B, I), h (B, H), c (B, H) (LSTM, else None),
    contiguous; returns h' (and c' for LSTM)."""

    @staticmethod
    def forward(ctx, mode, x, h, c, w_ih, w_hh, b_ih, b_hh):
        # (applied by run_cell only, on the states it vouches for)
        h_new, c_new, act = _ops.cell_cpu_forward(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, True,
                                                  states_checked=True)
        ctx.mode = mode
        ctx.sizes = (x.dtype, x.shape[0], x.shape[1], h.shape[1])
        ctx.set_materialize_grads(False)   # an unused output's gradient: None, read as zero
        save_with_biases(ctx, (x, h, c, w_ih, w_hh, act,
                               h_new if mode in (TANH, RELU) else None, c_new), (b_ih, b_hh))
        return (h_new, c_new) if mode == LSTM else h_new

    @staticmethod
    def backward(ctx, grad_h, grad_c=None):
        graph = torch.is_grad_enabled()
        saved, biases = unpack_saved(ctx, graph)
        x, h, c, w_ih, w_hh, act, h_new, c_new = saved
        if graph:
            return (None, *_cell_recompute(ctx.needs_input_grad[1:], ctx.mode, x, h, c,
                                           (w_ih, w_hh, *biases), grad_h, grad_c))
        n = ctx.needs_input_grad
        g = _ops.cell_cpu_backward(ctx.mode, grad_h, grad_c, x, h, c, h_new, c_new, act, w_ih,
                                   w_hh, (n[1], n[2], n[3], n[4], n[5], n[6] or n[7]),
                                   forward_sizes=ctx.sizes)
        return None, g[0], g[1], g[2], g[3], g[4], g[5], g[6]


def _one_step(mode, has_bias, x, h, c, weights, *, training):
    """The one-step layer kernels on a cell's 2-D operands: (h', c' or None, workspace or None)."""
    b_ih, b_hh = (weights[2], weights[3]) if has_bias else (None, None)
    _, h_new, c_new, ws = _ops.recurrent_layer_forward(
        mode, x.unsqueeze(0), h, weights[0], weights[1], b_ih, b_hh, cx=c, training=training)
    return h_new, c_new, ws


class _StepCell(torch.autograd.Function):
    """One step of a cell as a one-step layer (what the CPU cell kernels do not serve: CUDA, half
    precision, empty sizes): x (B, I), h (B, H), c (B, H) (LSTM, else None); weights w_ih, w_hh[,
    b_ih, b_hh]. Returns h' (and c' for LSTM): the layer's final states, straight from its kernels
    (no direction axis to add and remove, as _Layer's would). A one-step layer's output row is h',
    so the gradient enters through h' (and c') alone."""

    @staticmethod
    def forward(ctx, mode, has_bias, x, h, c, *weights):
        h_new, c_new, ws = _one_step(mode, has_bias, x, h, c, weights, training=True)
        ctx.cfg = (mode, has_bias)
        save_with_biases(ctx, (x, h, c, weights[0], weights[1], ws), weights[2:])
        return (h_new, c_new) if mode == LSTM else h_new

    @staticmethod
    def backward(ctx, grad_h, grad_c=None):
        mode, has_bias = ctx.cfg
        graph = torch.is_grad_enabled()
        saved, biases = unpack_saved(ctx, graph)
        x, h, c, w_ih, w_hh, ws = saved
        if graph:   # (needs_input_grad: mode, has_bias, x, h, c, *weights)
            grads = _cell_recompute(ctx.needs_input_grad[2:], mode, x, h, c,
                                    (w_ih, w_hh, *biases), grad_h, grad_c)
            return (None, None, *grads[:5 + len(biases)])
        n = ctx.needs_input_grad
        g = _ops.recurrent_layer_backward(
            mode, None, grad_h, x.unsqueeze(0), h, w_ih, w_hh, ws,
            grad_cn=grad_c if mode == LSTM else None, cx=c, has_bias=has_bias,
            needs_input_grad=n[2], needs_weight_grad=any(n[5:]))
        gx = None if g[0] is None else g[0].squeeze(0)
        gw = (g[3], g[4]) + ((g[5], g[6]) if has_bias else ())
        return (None, None, gx, g[1], g[2] if c is not None else None, *gw)


def _plain(t):
    """t itself when the kernels can read it (contiguous, no negative bit), else a copy: the
    common case in two cheap checks (_tensor.contiguous's numpy test costs more per call)."""
    if t is None or (t.is_contiguous() and not t.is_neg() and not t._is_zerotensor()):
        return t
    return _tensor.contiguous(t)


def run_cell(mode, x, h, c, weights, *, has_bias):
    """One step of RNNCell (TANH / RELU), LSTMCell or GRUCell on validated operands: x (B, I),
    h (B, H), c (B, H) for LSTM else None, of one dtype and device, their shapes checked (the
    cell modules' _cell does: the CPU kernels then check only the weights, states_checked);
    weights w_ih, w_hh[, b_ih, b_hh]. Returns h' or (h', c'). The CPU kernels take one step with
    the weights in place (float32/float64; traced: the custom op fastdl::recurrent_cell over
    them); anything else (CUDA, half precision, empty sizes) runs as a one-step layer. CPU
    float16 / bfloat16 operands run in float32 (_half)."""
    traced = _library.tracing(x)
    if not _ops.cell_cpu_supported(x, weights):
        if x.dtype in _HALF and _cpu_half(x, h, c, *weights, names=_CELL_NAMES):
            # (each step casts the weights to float32 copies again)
            out = run_cell(mode, *_float32(x, h, c), _float32(*weights), has_bias=has_bias)
            return _to_dtype(out, x.dtype)
        if not traced:
            # The one-step layer kernels straight on the 2-D states, whose final states are the
            # step's outputs (no per-direction select and stack around them).
            if _library.needs_autograd(x, h, c, *weights):
                return _StepCell.apply(mode, has_bias, x, h, c, *weights)
            h_new, c_new, _ = _one_step(mode, has_bias, x, h, c, weights, training=False)
            return (h_new, c_new) if mode == LSTM else h_new
        out = run_layer(mode, x.unsqueeze(0), h.unsqueeze(0),
                        None if c is None else c.unsqueeze(0), weights, dirs=1,
                        has_bias=has_bias, has_proj=False, batch_sizes=None)
        return (out[1][0], out[2][0]) if mode == LSTM else out[1][0]
    if traced:   # torch.compile / export: the custom op over the same kernels (_library)
        training = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, h, c, *weights))
        out = _library.recurrent_cell(_constant(mode, _MODES), x, h, c, list(weights), has_bias,
                                      training)
        return (out[0], out[1]) if mode == LSTM else out[0]
    x, h, c = _plain(x), _plain(h), _plain(c)
    w_ih, w_hh = _plain(weights[0]), _plain(weights[1])
    b_ih, b_hh = (_plain(weights[2]), _plain(weights[3])) if has_bias else (None, None)
    if _library.needs_autograd(x, h, c, w_ih, w_hh, b_ih, b_hh):
        return _Cell.apply(mode, x, h, c, w_ih, w_hh, b_ih, b_hh)
    h_new, c_new, _ = _ops.cell_cpu_forward(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, False,
                                            states_checked=True)
    return (h_new, c_new) if mode == LSTM else h_new


def run_layer(mode, x, h0, c0, weights, *, dirs, has_bias, has_proj, batch_sizes):
    """One layer: through autograd when anything needs a gradient, else straight to the kernels
    with nothing saved (inference). Traced (torch.compile / export), unpacked: the custom op."""
    if batch_sizes is not None and torch.jit.is_tracing():
        # (the custom op takes padded input only; the eager kernels are invisible to the tracer)
        raise RuntimeError("fastdl recurrent layers cannot be recorded by torch.jit.trace with a "
                           "PackedSequence input; pass a padded tensor, or use torch.nn.LSTM/GRU/"
                           "RNN there")
    if batch_sizes is None and _library.tracing(x):
        training = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                   for t in (x, h0, c0, *weights))
        out = _library.recurrent_layer(_constant(mode, _MODES), x, h0, c0, list(weights),
                                       _constant(dirs, (1, 2)), has_bias, has_proj, training)
        return (out[0], out[1], out[2]) if mode == LSTM else (out[0], out[1])
    if _library.needs_autograd(x, h0, c0, *weights):
        return _Layer.apply(mode, batch_sizes, dirs, has_bias, has_proj, x, h0, c0, *weights)
    per_dir = len(weights) // dirs
    ys, hns, cns = [], [], []
    for d in range(dirs):
        w_ih, w_hh, b_ih, b_hh, w_hr = _split(weights, d, per_dir, has_bias, has_proj)
        y, hn, cn, _ = _ops.recurrent_layer_forward(
            mode, x, h0[d], w_ih, w_hh, b_ih, b_hh, cx=None if c0 is None else c0[d],
            weight_hr=w_hr, batch_sizes=batch_sizes, reverse=d == 1, training=False)
        ys.append(y)
        hns.append(hn)
        cns.append(cn)
    y = ys[0] if dirs == 1 else torch.cat(ys, -1)
    if mode == LSTM:
        return y, torch.stack(hns), torch.stack(cns)
    return y, torch.stack(hns)


def run_layers(mode, x, h, c, flat_weights, *, num_layers, bidirectional, has_bias, has_proj,
               dropout, training, batch_sizes):
    """torch's _VF.lstm / gru / rnn_tanh / rnn_relu on time-major x (T, B, I) or packed data
    (N, I) with batch_sizes: h (L*D, B, R), c (L*D, B, H) or None. Dropout (when training) on the
    output of every layer but the last. Returns (output, h_n[, c_n]). CPU float16 / bfloat16
    operands run in float32, the states kept in float32 between steps and layers (_half)."""
    if x.dtype in _HALF and _cpu_half(x, h, c, *flat_weights, names=_LAYER_NAMES):
        out = run_layers(mode, *_float32(x, h, c), _float32(*flat_weights),
                         num_layers=num_layers, bidirectional=bidirectional, has_bias=has_bias,
                         has_proj=has_proj, dropout=dropout, training=training,
                         batch_sizes=batch_sizes)
        return _to_dtype(out, x.dtype)
    dirs = 2 if bidirectional else 1
    per_layer = len(flat_weights) // num_layers
    hns, cns = [], []
    for layer in range(num_layers):
        w = flat_weights[layer * per_layer:(layer + 1) * per_layer]
        h0 = h[layer * dirs:(layer + 1) * dirs]
        c0 = None if c is None else c[layer * dirs:(layer + 1) * dirs]
        out = run_layer(mode, x, h0, c0, w, dirs=dirs, has_bias=has_bias, has_proj=has_proj,
                        batch_sizes=batch_sizes)
        x = out[0]
        hns.append(out[1])
        if mode == LSTM:
            cns.append(out[2])
        if dropout > 0 and training and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, training=True)
    hn = hns[0] if num_layers == 1 else torch.cat(hns, 0)
    if mode == LSTM:
        return x, hn, (cns[0] if num_layers == 1 else torch.cat(cns, 0))
    return x, hn
