"""torch.nn modules with torch's constructors, parameter names and state_dict layout.
One module per op family (pool.py, linear.py, ...), re-exported here."""
from .linear import Linear  # noqa: F401

__all__ = ["Linear"]
