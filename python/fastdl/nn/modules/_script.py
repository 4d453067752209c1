"""torch.jit.script over fastdl.nn modules: a clear error instead of TorchScript's.

TorchScript compiles a module's forward from its Python source, and fastdl's forwards call the
kernels through Python (autograd Functions, torch.library custom ops), which TorchScript cannot
compile: it failed deep in fastdl's code ("Python builtin ... is currently not supported in
Torchscript"). torch.jit.script calls __prepare_scriptable__ on every module of the tree first,
so each fastdl module raises there, naming itself and the ways that work. (Returning torch's
module instead would replace the layer inside the user's own model: torch.jit.script writes the
prepared submodules back into their parents.)
"""
from __future__ import annotations


class NotScriptable:
    """Mixin for every public fastdl.nn module: torch.jit.script raises a RuntimeError naming it."""

    def __prepare_scriptable__(self):
        name = type(self).__name__
        raise RuntimeError(
            f"torch.jit.script cannot compile fastdl.nn.{name}: its forward calls fastdl's kernels "
            "through Python, which TorchScript cannot run. torch.jit.trace and torch.export "
            "record fastdl's custom ops (import fastdl before loading them); or script a model "
            f"built from torch.nn.{name}.")
