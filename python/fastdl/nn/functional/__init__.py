"""torch.nn.functional's signatures and autograd, computed by fastdl kernels.
One module per op family (pool.py, linear.py, ...), re-exported here."""
from .linear import linear  # noqa: F401
