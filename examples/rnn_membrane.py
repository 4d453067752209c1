"""An LSTM forecasting a real recording: the membrane-voltage trace of a neuron (12,000
float32 samples, resting near -0.67 V with action potentials) that ships inside matplotlib as
sample data (mpl-data/sample_data/membrane.dat, read with matplotlib.cbook.get_sample_data; no
download). Every 2nd sample is kept; from the last 32 samples the model predicts the sample 6
steps ahead.

    python examples/rnn_membrane.py

Stated baseline: persistence (the forecast is the last observed sample), the usual yardstick of
a forecast; a linear autoregression on the same 32 samples (least squares) is printed too. The
series is split in time order: the first 60% trains, the next 20% validates (EarlyStopping
with patience 2 restores the best epoch, usually the third), the last 20% tests. Batches of 128
and patience 2 run it about 2.5x faster than batches of 64 and patience 4 did (same load), with
the same test MSE ratio to persistence (about 0.48). Checks that the LSTM's test MSE is below 0.75x
persistence's and below the linear autoregression's.
"""
import numpy as np
import torch

import fastdl
from fastdl import metrics
from fastdl.callbacks import EarlyStopping

LSTM = torch.nn.LSTM  # switch to fastdl.nn.LSTM when it lands

STRIDE, WINDOW, AHEAD = 2, 32, 6


def load_membrane():
    from matplotlib import cbook
    with cbook.get_sample_data("membrane.dat") as f:
        return np.fromfile(f, dtype=np.float32)[::STRIDE].astype(np.float64).reshape(-1, 1)


def windows(series):
    """x: (n, WINDOW, 1) past samples; y: (n, 1) the sample AHEAD steps after each window."""
    n = len(series) - WINDOW - AHEAD + 1
    x = np.stack([series[i:i + WINDOW] for i in range(n)])
    y = np.stack([series[i + WINDOW + AHEAD - 1] for i in range(n)])
    return x.astype(np.float32), y.astype(np.float32)


class Forecaster(torch.nn.Module):
    """LSTM over the window, a linear read-out of its last hidden state."""

    def __init__(self, channels=1, hidden=32):
        super().__init__()
        self.rnn = LSTM(channels, hidden, batch_first=True)
        self.head = fastdl.nn.Linear(hidden, channels)

    def forward(self, x):                 # x: (batch, WINDOW, channels) -> (batch, channels)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def load():
    """(train, validation, test) windows, standardised with the training part's statistics."""
    series = load_membrane()
    n = len(series)
    parts = series[:int(0.6 * n)], series[int(0.6 * n):int(0.8 * n)], series[int(0.8 * n):]
    scaler = fastdl.preprocessing.StandardScaler().fit(parts[0])
    return [windows(scaler.transform(p)) for p in parts]


def linear_autoregression(x_tr, y_tr, x_te):
    """Least-squares y ~ w . window + b: the linear baseline."""
    design = np.c_[x_tr[:, :, 0], np.ones(len(x_tr))]
    w = np.linalg.lstsq(design, y_tr[:, 0], rcond=None)[0]
    return (np.c_[x_te[:, :, 0], np.ones(len(x_te))] @ w)[:, None]


def main(seed=0, max_epochs=15, verbose=0):
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = load()
    torch.manual_seed(seed)
    model = fastdl.Model(Forecaster())
    model.compile(optimizer=fastdl.optim.Adam(model.parameters(), lr=3e-3), loss="mse")
    history = model.fit(x_tr, y_tr, batch_size=128, epochs=max_epochs,
                        validation_data=(x_val, y_val), verbose=verbose,
                        callbacks=[EarlyStopping(patience=2, restore_best_weights=True)])
    mse = metrics.mean_squared_error(y_te, model.predict(x_te))
    persistence = metrics.mean_squared_error(y_te, x_te[:, -1])
    linear = metrics.mean_squared_error(y_te, linear_autoregression(x_tr, y_tr, x_te))
    print(f"test MSE (standardised), {AHEAD} samples ahead: LSTM {mse:.4f}, persistence "
          f"{persistence:.4f}, linear autoregression {linear:.4f}; LSTM / persistence = "
          f"{mse / persistence:.3f} after {len(history.epoch)} epochs")
    assert mse < 0.75 * persistence, (mse, persistence)
    assert mse < linear, (mse, linear)
    return {"mse": mse, "persistence": persistence, "linear": linear}


if __name__ == "__main__":
    main()
