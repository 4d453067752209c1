"""A small CNN on the 8x8 handwritten digits shipped with scikit-learn (1797 images, 10
classes), trained with EarlyStopping and ModelCheckpoint.

    python examples/cnn_digits.py

Conv2d -> ReLU -> MaxPool2d -> Conv2d -> ReLU -> MaxPool2d -> Linear -> ReLU -> Linear, in a
fastdl.Sequential, fastdl.optim.Adam, sparse categorical cross-entropy. Training stops when the
validation loss has not improved for 5 epochs and restores the best weights; the best epoch's
weights are also checkpointed (atomically) and reloaded before testing. Checks test accuracy
>= 0.97.
"""
import os
import tempfile

import numpy as np
import torch
from sklearn.datasets import load_digits

import fastdl
from fastdl import metrics
from fastdl.callbacks import EarlyStopping, ModelCheckpoint
from fastdl.preprocessing import train_test_split

Conv2d = fastdl.nn.Conv2d


def make_model():
    return fastdl.Sequential(
        Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), fastdl.nn.MaxPool2d(2),     # 16x4x4
        Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), fastdl.nn.MaxPool2d(2),    # 32x2x2
        torch.nn.Flatten(), fastdl.nn.Linear(32 * 2 * 2, 64), torch.nn.ReLU(),
        fastdl.nn.Linear(64, 10))


def load(seed=0):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]       # N x 1 x 8 x 8 in [0, 1]
    return train_test_split(x, digits.target, test_size=0.2, random_state=seed)


def main(seed=0, max_epochs=40, verbose=0):
    x_train, x_test, y_train, y_test = load(seed)
    torch.manual_seed(seed)
    model = make_model()
    model.compile(optimizer=fastdl.optim.Adam(model.parameters(), lr=5e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    with tempfile.TemporaryDirectory() as tmp:
        best = os.path.join(tmp, "digits-best.pt")
        callbacks = [EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True),
                     ModelCheckpoint(best, monitor="val_loss", save_best_only=True)]
        history = model.fit(x_train, y_train, batch_size=64, epochs=max_epochs,
                            validation_split=0.15, callbacks=callbacks, verbose=verbose)
        model.load_weights(best)                  # the checkpoint holds the same best epoch
    if verbose:
        model.summary(input_shape=(1, 8, 8))
    pred = model.predict(x_test).argmax(1)
    acc = metrics.accuracy_score(y_test, pred)
    f1 = metrics.f1_score(y_test, pred, average="macro")
    epochs = len(history.epoch)
    best_epoch = int(np.argmin(history.history["val_loss"])) + 1
    print(f"stopped after {epochs} epochs (best val_loss at epoch {best_epoch}); "
          f"test accuracy {acc:.4f}, macro F1 {f1:.4f} on {len(y_test)} digits")
    assert acc >= 0.97, acc
    return {"accuracy": acc, "f1": f1, "epochs": epochs}


if __name__ == "__main__":
    main(verbose=1)
