"""Linear regression, Keras style, on the founding document's data: X uniform in [0, 1),
Y = 3 X + 2 + noise uniform in [0, 1). The fitted line has slope ~3 and intercept ~2.5 (the
noise's mean, 0.5, moves the intercept).

    python examples/linear_regression_keras.py

Uses fastdl.Sequential (compile / fit / predict), fastdl.nn.Linear and fastdl.optim.SGD.
Ends by checking the slope and intercept.
"""
import numpy as np

import fastdl


def main(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((1000, 1))                       # founding data, numpy float64
    y = 3 * x + 2 + rng.random((1000, 1))

    import torch
    torch.manual_seed(seed)
    model = fastdl.Sequential(fastdl.nn.Linear(1, 1))
    model.compile(optimizer=fastdl.optim.SGD(model.parameters(), lr=0.1), loss="mse")
    history = model.fit(x, y, batch_size=32, epochs=30, validation_split=0.2, verbose=0)

    slope = model[0].weight.item()
    intercept = model[0].bias.item()
    pred = model.predict(np.array([[0.0], [1.0]]))
    print(f"slope {slope:.3f} (true 3), intercept {intercept:.3f} (expected 2.5), "
          f"val MSE {history.history['val_loss'][-1]:.4f} (noise variance 1/12 = 0.0833)")
    print(f"predict([0, 1]) = {pred.ravel().round(3).tolist()}")
    assert abs(slope - 3.0) < 0.1, slope
    assert abs(intercept - 2.5) < 0.1, intercept
    return {"slope": slope, "intercept": intercept}


if __name__ == "__main__":
    main()
