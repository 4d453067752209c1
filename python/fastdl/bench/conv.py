"""Benchmark suite 'conv': convolution forward and forward+backward, fastdl against
torch.nn.functional (oneDNN on the CPU), float32, the seven shapes of issue #8:
  1. 64x1x28x28   -> 32, 3x3 s1 p0            first layer of an MNIST CNN
  2. 64x32x26x26  -> 64, 3x3 s1 p0            its second layer
  3. 32x64x56x56  -> 64, 3x3 s1 p1            ResNet block
  4. 32x64x56x56  -> 128, 1x1                 pointwise
  5. 32x128x28x28 -> 128, 3x3 s2 p1           strided
  6. 32x64x56x56  -> 64, 3x3 s1 p1 groups=64  depthwise
  7. 16x64x28x28  -> 32, transposed 4x4 s2 p1 decoder upsampling
Work on paper: direct-convolution flops, 2 * N * K * OH * OW * (C/groups) * kh * kw per pass
(for the transposed one, 2 * N * Cin * H * W * (Cout/groups) * kh * kw); forward+backward counts
the forward, the input gradient and the weight gradient (shape 1, a first layer whose input needs
no gradient, counts forward and weight gradient only). Both sides get the same inputs; the
fwd+bwd cases reset the gradients each call (no accumulation pass).
On CUDA (--device cuda) the reference is cuDNN, precision-matched: fastdl's kernels are exact
float32 (no tensor cores), so every timed call on either side runs inside _exact_fp32(), which
switches torch.backends.cudnn.allow_tf32 off for that call and restores the caller's setting
after (torch's default is on, which would let cuDNN round its inputs to TF32); nothing leaks
into later suites or into a process that uses fastdl-bench as a library.
"""
from __future__ import annotations

# (label, N, C, H, W, K, kernel, stride, padding, groups, transposed)
SHAPES = [("1 mnist c1", 64, 1, 28, 28, 32, 3, 1, 0, 1, False),
          ("2 mnist c2", 64, 32, 26, 26, 64, 3, 1, 0, 1, False),
          ("3 resnet 3x3", 32, 64, 56, 56, 64, 3, 1, 1, 1, False),
          ("4 1x1", 32, 64, 56, 56, 128, 1, 1, 0, 1, False),
          ("5 3x3 s2", 32, 128, 28, 28, 128, 3, 2, 1, 1, False),
          ("6 depthwise", 32, 64, 56, 56, 64, 3, 1, 1, 64, False),
          ("7 transposed", 16, 64, 28, 28, 32, 4, 2, 1, 1, True)]


def _exact_fp32():
    """cuDNN without TF32 for the block, the caller's setting restored after. Through
    torch.backends.cudnn.flags() (which also works after torch's test utilities have frozen the
    global flags), passing the current enabled/benchmark/deterministic so only TF32 changes."""
    import torch

    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                       deterministic=cudnn.deterministic, allow_tf32=False)


def _exact(fn):
    """fn run under _exact_fp32(); both sides get the wrapper so they pay the same overhead."""
    def call():
        with _exact_fp32():
            return fn()
    return call


def _fwd_bwd(fn, leaves, gy):
    def step():
        for t in leaves:
            t.grad = None
        fn().backward(gy)
    return step


def cases(device="cpu", quick=False):
    import torch
    import torch.nn.functional as TF

    import fastdl.nn.functional as F
    from .harness import Case

    # precision-matched on CUDA: both sides exact float32, the global setting untouched
    wrap = _exact if device == "cuda" else (lambda fn: fn)
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for label, n, c, h, w, k, ks, s, p, groups, transposed in SHAPES:
        if quick:
            n = max(1, n // 8)
        x = torch.randn(n, c, h, w, generator=g).to(device)
        if transposed:
            wt = torch.randn(c, k // groups, ks, ks, generator=g).to(device)
            fast_fn, ref_fn = F.conv_transpose2d, TF.conv_transpose2d
        else:
            wt = torch.randn(k, c // groups, ks, ks, generator=g).to(device)
            fast_fn, ref_fn = F.conv2d, TF.conv2d
        b = torch.randn(k, generator=g).to(device)
        kw = dict(stride=s, padding=p, groups=groups)
        y = ref_fn(x, wt, b, **kw)
        if transposed:
            flops = 2.0 * n * c * h * w * (k // groups) * ks * ks
        else:
            flops = 2.0 * y.numel() * (c // groups) * ks * ks
        shape = f"{n}x{c}x{h}x{w}->{k} k{ks}s{s}p{p}" + (f"g{groups}" if groups > 1 else "") + \
            (" T" if transposed else "")
        a = (x, wt, b)
        out.append(Case("conv", f"{label} fwd", wrap(lambda f=fast_fn, a=a, kw=kw: f(*a, **kw)),
                        {"torch": wrap(lambda f=ref_fn, a=a, kw=kw: f(*a, **kw))}, flops=flops,
                        flops_equivalent=True, device=device, note=shape))
        first_layer = c == 1
        xg = x.clone().requires_grad_(not first_layer)
        wg, bg = wt.clone().requires_grad_(), b.clone().requires_grad_()
        gy = torch.randn(y.shape, generator=g).to(device)
        leaves = [xg, wg, bg]
        passes = 2 if first_layer else 3
        out.append(Case("conv", f"{label} fwd+bwd",
                        wrap(_fwd_bwd(lambda f=fast_fn, a=leaves, kw=kw: f(*a, **kw), leaves, gy)),
                        {"torch": wrap(_fwd_bwd(lambda f=ref_fn, a=leaves, kw=kw: f(*a, **kw),
                                                leaves, gy))},
                        flops=passes * flops, flops_equivalent=True, device=device, note=shape))
    return out
