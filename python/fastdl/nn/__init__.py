"""Drop-in replacements for torch.nn modules and torch.nn.functional, backed by fastdl kernels.

>>> import fastdl.nn as nn
>>> nn.functional        # same signatures as torch.nn.functional
"""
from . import functional  # noqa: F401
from .modules import *  # noqa: F401,F403
from ._convert import ConvertReport, convert  # noqa: F401,E402
