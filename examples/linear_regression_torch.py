"""Linear regression in the plain PyTorch loop style on the founding document's data: X uniform
in [0, 1), Y = 3 X + 2 + noise uniform in [0, 1). The fitted line has slope ~3 and intercept
~2.5 (the noise's mean, 0.5, moves the intercept).

    python examples/linear_regression_torch.py

A hand-written loop (forward, loss, zero_grad, backward, step) over fastdl.nn.Linear and
fastdl.optim.SGD, the same model the Keras-style example fits with model.fit.
"""
import torch

import fastdl


def main(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1000, 1, generator=g)
    y = 3 * x + 2 + torch.rand(1000, 1, generator=g)

    torch.manual_seed(seed)
    model = fastdl.nn.Linear(1, 1)
    opt = fastdl.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss()
    for epoch in range(30):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        mse = loss_fn(model(x), y).item()
    slope, intercept = model.weight.item(), model.bias.item()
    print(f"slope {slope:.3f} (true 3), intercept {intercept:.3f} (expected 2.5), "
          f"MSE {mse:.4f} (noise variance 1/12 = 0.0833)")
    assert abs(slope - 3.0) < 0.1, slope
    assert abs(intercept - 2.5) < 0.1, intercept
    return {"slope": slope, "intercept": intercept}


if __name__ == "__main__":
    main()
