"""MLX: code written for mlx.optimizers, with ``import treeopt as optim`` instead; the step
is compiled with the optimizer state captured.

    python examples/mlx_digits.py --steps 200

Install (from the treeopt checkout): pip install -e ".[mlx]"
"""

import argparse
from functools import partial

try:
    import mlx.core as mx
    import mlx.nn as nn
except ImportError as error:  # missing, or installed without what it needs (a bare mlx on Linux)
    raise SystemExit(f"MLX cannot be imported ({error}): pip install -e '.[mlx]' (from the treeopt checkout)") from None

from digits_data import train_test_split

import treeopt as optim


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(64, 128)
        self.hidden = nn.Linear(128, 128)
        self.head = nn.Linear(128, 10)

    def __call__(self, x):
        return self.head(nn.gelu(self.hidden(nn.gelu(self.embed(x)))))


def main(steps=200, seed=0):
    mx.random.seed(seed)
    x_train, y_train, x_test, y_test = (mx.array(a) for a in train_test_split(seed))
    model = MLP()
    optimizer = optim.MultiOptimizer(
        [optim.Muon(optim.cosine_decay(0.02, steps)), optim.AdamW(optim.cosine_decay(3e-3, steps))],
        [lambda path, w: path == "hidden.weight"],
    )

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y).mean()

    state = [model.state, optimizer.state]
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    for i in range(steps):
        batch = mx.random.randint(0, len(y_train), (128,))
        loss = step(x_train[batch], y_train[batch])
        mx.eval(state)
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {loss.item():.4f}")
    accuracy = (model(x_test).argmax(-1) == y_test).astype(mx.float32).mean().item()
    print(f"test accuracy {100 * accuracy:.1f}%")
    return loss.item(), accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
