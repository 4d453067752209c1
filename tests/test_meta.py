"""Meta tensors (shapes and dtypes only, no data: model-size estimates, deferred initialisation)
through every fastdl.nn module: as torch's own modules, each gives the output torch's would
(shape, dtype, device, every output of a tuple) and a backward that reaches the input and every
parameter, computed by torch's meta kernels (fastdl's kernels cannot read meta memory; they
raised RuntimeError before). A meta input with CPU parameters goes to torch's op too, which
raises. (A CPU input with a meta weight or bias raises RuntimeError in fastdl's checks; torch's
linear and convolutions return a CPU tensor there.)"""
import pytest
import torch

import fastdl
import fastdl.nn as fnn
import fastdl.nn.functional as F

MODULES = {
    "Linear": ((3, 4), {}, (2, 3)),
    "Conv1d": ((3, 4, 3), {}, (2, 3, 8)),
    "Conv2d": ((3, 4, 3), dict(padding=1, stride=2), (2, 3, 9, 8)),
    "Conv2d reflect": ((3, 4, 3), dict(padding=1, padding_mode="reflect"), (2, 3, 8, 8)),
    "ConvTranspose2d": ((3, 4, 3), dict(stride=2, output_padding=1), (2, 3, 5, 6)),
    "ConvTranspose1d": ((3, 4, 3), dict(stride=2, dilation=2), (2, 3, 5)),
    "MaxPool2d": ((2,), dict(return_indices=True), (2, 3, 8, 7)),
    "AvgPool2d": ((3, 2), dict(ceil_mode=True), (2, 3, 8, 8)),
    "AdaptiveAvgPool2d": ((3,), {}, (2, 3, 8, 8)),
    "AdaptiveMaxPool2d": ((3,), dict(return_indices=True), (2, 3, 8, 8)),
    "MaxPool1d": ((3,), dict(stride=2, return_indices=True), (2, 3, 9)),
    "AvgPool1d": ((2,), dict(ceil_mode=True), (3, 9)),
    "AdaptiveAvgPool1d": ((4,), {}, (2, 3, 9)),
    "AdaptiveMaxPool1d": ((4,), dict(return_indices=True), (2, 3, 9)),
    "LSTM": ((3, 4, 2), dict(bidirectional=True, proj_size=2), (5, 2, 3)),
    "GRU": ((3, 4), dict(batch_first=True), (2, 5, 3)),
    "RNN": ((3, 4), dict(nonlinearity="relu"), (5, 3)),
    "LSTMCell": ((3, 4), {}, (2, 3)),
    "GRUCell": ((3, 4), {}, (3,)),
    "RNNCell": ((3, 4), {}, (2, 3)),
}


def _leaves(out):
    return torch.utils._pytree.tree_leaves(out)


@pytest.mark.parametrize("name", list(MODULES))
def test_module_on_meta_as_torch(name):
    args, kwargs, shape = MODULES[name]
    cls = name.split(" ")[0]
    with torch.device("meta"):
        ours, theirs = getattr(fnn, cls)(*args, **kwargs), getattr(torch.nn, cls)(*args, **kwargs)
    x = torch.empty(shape, device="meta", requires_grad=True)
    got, want = _leaves(ours(x)), _leaves(theirs(x))
    assert [(t.shape, t.dtype, t.device) for t in got] == \
        [(t.shape, t.dtype, t.device) for t in want]
    sum(t.sum() for t in got if t.is_floating_point()).backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.is_meta
    for n, p in ours.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.is_meta, n


def test_functions_on_meta_as_torch():
    x = torch.empty(2, 3, 8, 8, device="meta")
    w = torch.empty(4, 3, 3, 3, device="meta")
    y, i = F.max_pool2d(x, 2, return_indices=True)
    pairs = [(F.conv2d(x, w, padding="same"), torch.nn.functional.conv2d(x, w, padding="same")),
             (F.conv_transpose2d(x, w.transpose(0, 1), stride=2),
              torch.nn.functional.conv_transpose2d(x, w.transpose(0, 1), stride=2)),
             (F.linear(x, torch.empty(5, 8, device="meta")),
              torch.nn.functional.linear(x, torch.empty(5, 8, device="meta"))),
             (F.max_unpool2d(y, i, 2), torch.nn.functional.max_unpool2d(y, i, 2)),
             (F.avg_pool2d(x.double(), 3), torch.nn.functional.avg_pool2d(x.double(), 3))]
    for got, want in pairs:
        assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device)


def test_meta_input_with_cpu_parameters_goes_to_torch_and_raises():
    x = torch.empty(2, 3, device="meta")
    for ours, theirs in [(fnn.Linear(3, 4), torch.nn.Linear(3, 4)),
                         (fnn.LSTMCell(3, 4), torch.nn.LSTMCell(3, 4))]:
        with pytest.raises(Exception) as want:
            theirs(x)
        with pytest.raises(type(want.value)):
            ours(x)


def test_kernels_still_refuse_meta():
    # fastdl.ops runs the kernels themselves: meta memory must never reach them
    with pytest.raises(RuntimeError, match="meta"):
        fastdl.ops.conv2d(torch.empty(1, 2, 5, 5, device="meta"),
                          torch.empty(3, 2, 3, 3, device="meta"))
