"""torch.nn.functional's signatures and autograd, computed by fastdl kernels.
One module per op family (pool.py, linear.py, ...), re-exported here."""
from .conv import conv1d, conv2d, conv_transpose1d, conv_transpose2d  # noqa: F401
from .linear import linear  # noqa: F401
from .pool import (adaptive_avg_pool1d, adaptive_avg_pool2d, adaptive_max_pool1d,  # noqa: F401
                   adaptive_max_pool2d, avg_pool1d, avg_pool2d, max_pool1d, max_pool2d,
                   max_unpool1d, max_unpool2d)
