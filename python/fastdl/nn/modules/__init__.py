"""torch.nn modules with torch's constructors, parameter names and state_dict layout.
One module per op family (pool.py, linear.py, ...), re-exported here."""
from .conv import Conv1d, Conv2d, ConvTranspose1d, ConvTranspose2d  # noqa: F401
from .linear import Linear  # noqa: F401
from .pool import (AdaptiveAvgPool2d, AdaptiveMaxPool2d, AvgPool2d, MaxPool2d,  # noqa: F401
                   MaxUnpool2d)
from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell  # noqa: F401

__all__ = ["Conv1d", "Conv2d", "ConvTranspose1d", "ConvTranspose2d", "Linear", "MaxPool2d",
           "AvgPool2d", "AdaptiveMaxPool2d", "AdaptiveAvgPool2d", "MaxUnpool2d", "RNN", "LSTM", "GRU", "RNNCell",
           "LSTMCell", "GRUCell"]
