"""Framework-agnostic kernels: numpy arrays in, numpy arrays out; torch tensors in, torch out.

>>> import numpy as np, fastdl
>>> p = np.random.rand(8).astype(np.float32); g = np.random.rand(8).astype(np.float32)
>>> fastdl.ops.sgd_step(p, g, lr=0.1)            # in place, like torch.optim.SGD
>>> fastdl.ops.matmul(np.ones((2, 3)), np.ones((3, 4)))   # like torch.mm
"""
from .conv import (conv2d, conv2d_backward, conv_transpose2d, conv_transpose2d_backward,
                   get_conv_algorithm, set_conv_algorithm)
from .gemm import gemm, matmul
from .linear import linear, linear_backward
from .optim import adam_step, rmsprop_step, sgd_step
from .pool import (adaptive_avg_pool2d, adaptive_avg_pool2d_backward, adaptive_max_pool2d,
                   adaptive_max_pool2d_backward, avg_pool2d, avg_pool2d_backward, max_pool2d,
                   max_pool2d_backward, max_unpool2d, max_unpool2d_backward)

__all__ = ["sgd_step", "adam_step", "rmsprop_step", "matmul", "gemm", "linear", "linear_backward",
           "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
           "adaptive_max_pool2d", "adaptive_max_pool2d_backward", "adaptive_avg_pool2d",
           "adaptive_avg_pool2d_backward", "max_unpool2d", "max_unpool2d_backward", "conv2d",
           "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward",
           "set_conv_algorithm", "get_conv_algorithm"]
