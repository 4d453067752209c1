"""Framework-agnostic kernels: numpy arrays in, numpy arrays out; torch tensors in, torch out.

>>> import numpy as np, fastdl
>>> p = np.random.rand(8).astype(np.float32); g = np.random.rand(8).astype(np.float32)
>>> fastdl.ops.sgd_step(p, g, lr=0.1)            # in place, like torch.optim.SGD
>>> fastdl.ops.matmul(np.ones((2, 3)), np.ones((3, 4)))   # like torch.mm
"""
from .gemm import gemm, matmul
from .linear import linear, linear_backward
from .optim import adam_step, rmsprop_step, sgd_step

__all__ = ["sgd_step", "adam_step", "rmsprop_step", "matmul", "gemm", "linear", "linear_backward"]
