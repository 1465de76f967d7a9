"""PyTorch: a small MLP on the 8x8 digits, Muon for the hidden matrices and AdamW for the
rest, driven by treeopt.torch.Optimizer like any torch.optim optimizer.

    python examples/torch_digits.py --steps 200

Install (from the treeopt checkout): pip install -e ".[torch]"
"""

import argparse

try:
    import torch
except ImportError as error:  # missing, or installed without what it needs (a bare mlx on Linux)
    raise SystemExit(
        f"PyTorch cannot be imported ({error}): pip install -e '.[torch]' (from the treeopt checkout)"
    ) from None

from digits_data import train_test_split

import treeopt as optim
import treeopt.torch


def hidden_matrix(name, param):
    return name.startswith("hidden.") and param.ndim == 2


def main(steps=200, seed=0):
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in train_test_split(seed))
    model = torch.nn.Sequential()
    model.add_module("embed", torch.nn.Linear(64, 128))
    model.add_module("act", torch.nn.GELU())
    model.add_module("hidden", torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU()))
    model.add_module("head", torch.nn.Linear(128, 10))

    schedule = optim.join_schedules([optim.linear_schedule(0.0, 1.0, 20), optim.cosine_decay(1.0, steps)], [20])
    opt = treeopt.torch.Optimizer(
        model,
        optim.MultiOptimizer(
            [optim.Muon(lambda t: 0.02 * schedule(t)), optim.AdamW(lambda t: 3e-3 * schedule(t))], [hidden_matrix]
        ),
    )

    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = torch.randint(len(y_train), (128,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    print(f"test accuracy {100 * accuracy:.1f}%")
    return loss.item(), accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
