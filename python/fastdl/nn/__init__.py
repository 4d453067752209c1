"""Drop-in replacements for torch.nn modules and torch.nn.functional, backed by fastdl kernels.
Under torch.func transforms (vmap, grad, jacrev, jvp) and for calls with a forward-AD tangent,
each layer runs torch's own op on the same arguments (fastdl._library.route): torch's results.

>>> import fastdl.nn as nn
>>> nn.functional        # same signatures as torch.nn.functional
"""
from . import functional  # noqa: F401
from .modules import *  # noqa: F401,F403
from ._convert import ConvertReport, convert  # noqa: F401,E402
