"""Train a small MLP regressor on synthetic data with fastdl's fused AdamW and a torch LR
scheduler, then compare with torch.optim.AdamW on the same data and initialisation.

    python examples/train_regression.py

The two runs start from the same weights and see the same batches. Their losses agree for the
first steps (the optimizer updates match torch's to float32 rounding: tests/test_optim.py) and
then drift apart, as any two float32 implementations do over hundreds of steps of a ReLU network;
both converge.
"""
import time

import torch

import fastdl


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 1))


def train(opt_cls, x, y, epochs=30):
    model = make_model(0)
    opt = opt_cls(model.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for i in range(0, len(x), 256):
            loss = torch.nn.functional.mse_loss(model(x[i:i + 256]), y[i:i + 256])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y).item()
    return final, time.perf_counter() - t0


if __name__ == "__main__":
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 32, generator=g)
    w = torch.randn(32, 1, generator=g)
    y = torch.sin(x @ w) + 0.05 * torch.randn(4096, 1, generator=g)
    for name, cls in [("fastdl.optim.AdamW", fastdl.optim.AdamW), ("torch.optim.AdamW", torch.optim.AdamW)]:
        loss, secs = train(cls, x, y)
        print(f"{name:<20} final MSE {loss:.5f}  ({secs:.1f} s)")
