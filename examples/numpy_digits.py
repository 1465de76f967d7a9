"""NumPy only: a small MLP on the 8x8 digits, its backward pass written out, with Muon for
the hidden matrix and AdamW for the rest in one MultiOptimizer.

    python examples/numpy_digits.py --steps 200

Install (from the treeopt checkout): pip install -e .
"""

import argparse
import os

# the matrices are 128 x 128: a second BLAS thread costs more in hand-offs than it saves (with
# OpenBLAS's default threads this example took 10x longer on a busy 2-core machine)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402  (after the line above: OpenBLAS reads it when it loads)
from digits_data import train_test_split  # noqa: E402

import treeopt as optim  # noqa: E402

LAYERS = ("embed", "hidden", "head")


def init_params(sizes=(64, 128, 128, 10), seed=0, dtype=np.float32):
    """Weights ``(out, in)`` as in ``mlx.nn.Linear``, so the paths read ``hidden.weight``."""
    rng = np.random.default_rng(seed)
    return {
        name: {
            "weight": (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(dtype),
            "bias": np.zeros(n_out, dtype),
        }
        for name, n_in, n_out in zip(LAYERS, sizes, sizes[1:])
    }


def forward(params, x):
    """The logits, and the input of each layer (what the backward pass needs)."""
    inputs = []
    for name in LAYERS:
        inputs.append(x)
        x = x @ params[name]["weight"].T + params[name]["bias"]
        if name != "head":
            x = np.tanh(x)
    return x, inputs


def loss_and_grads(params, x, labels):
    """The mean softmax cross-entropy and its gradient, a tree shaped like ``params``."""
    logits, inputs = forward(params, x)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    delta = np.exp(log_probs)
    delta[rows, labels] -= 1.0
    delta /= len(labels)  # d loss / d logits
    grads = {}
    for name, h in zip(reversed(LAYERS), reversed(inputs)):
        grads[name] = {"weight": delta.T @ h, "bias": delta.sum(axis=0)}
        if name != "embed":  # back through this layer and the tanh below it (h is its output)
            delta = (delta @ params[name]["weight"]) * (1.0 - h * h)
    return float(-log_probs[rows, labels].mean()), grads


def main(steps=200, seed=0):
    x_train, y_train, x_test, y_test = train_test_split(seed)
    params = init_params(seed=seed)
    opt = optim.MultiOptimizer(
        [optim.Muon(optim.cosine_decay(0.02, steps)), optim.AdamW(optim.cosine_decay(3e-3, steps))],
        [optim.filters.glob("hidden.weight")],  # Muon for the hidden matrix; AdamW takes the rest
        max_grad_norm=1.0,
    )
    opt.plan(params).print()
    rng = np.random.default_rng(seed)
    for step in range(steps):
        batch = rng.integers(0, len(y_train), 128)
        loss, grads = loss_and_grads(params, x_train[batch], y_train[batch])
        opt.update(params, grads)  # NumPy arrays are updated in place
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss:.4f}")
    accuracy = float((forward(params, x_test)[0].argmax(axis=1) == y_test).mean())
    print(f"test accuracy {100 * accuracy:.1f}%")
    return loss, accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
