"""JAX + optax: treeopt's Muon + AdamW as an optax GradientTransformation, chained after
global-norm clipping, in a jitted training step.

    python examples/jax_optax_digits.py --steps 200

Install (from the treeopt checkout): pip install -e ".[jax]"
"""

import argparse

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError as error:  # missing, or installed without what it needs (a bare mlx on Linux)
    raise SystemExit(
        f"JAX and optax cannot be imported ({error}): pip install -e '.[jax]' (from the treeopt checkout)"
    ) from None

from digits_data import train_test_split

import treeopt as optim
import treeopt.jax


def init_params(key, sizes=(64, 128, 128, 10)):
    params = {}
    names = ["embed", "hidden", "head"]
    for name, (fan_in, fan_out), k in zip(names, zip(sizes, sizes[1:]), jax.random.split(key, len(names))):
        params[name] = {"w": jax.random.normal(k, (fan_in, fan_out)) / jnp.sqrt(fan_in), "b": jnp.zeros(fan_out)}
    return params


def logits(params, x):
    x = jax.nn.gelu(x @ params["embed"]["w"] + params["embed"]["b"])
    x = jax.nn.gelu(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return x @ params["head"]["w"] + params["head"]["b"]


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def main(steps=200, seed=0):
    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in train_test_split(seed))
    params = init_params(jax.random.key(seed))
    multi = optim.MultiOptimizer(
        [optim.Muon(optim.cosine_decay(0.02, steps)), optim.AdamW(optim.cosine_decay(3e-3, steps))],
        [lambda path, w: path == "hidden.w"],
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), treeopt.jax.as_optax(multi))
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    key = jax.random.key(seed + 1)
    for i in range(steps):
        key, sub = jax.random.split(key)
        batch = jax.random.randint(sub, (128,), 0, len(y_train))
        params, state, loss = step(params, state, x_train[batch], y_train[batch])
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(loss):.4f}")
    accuracy = float((logits(params, x_test).argmax(-1) == y_test).mean())
    print(f"test accuracy {100 * accuracy:.1f}%")
    return float(loss), accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
