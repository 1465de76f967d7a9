"""Muon on a flax nnx model, whose weights are (in, out) and conv kernels (kh, kw, in, out),
through treeopt.jax, against optax's own Muon given the same dimension numbers."""

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the flax tests need jax")
optax = pytest.importorskip("optax", reason="optax's Muon is the reference")
nnx = pytest.importorskip("flax.nnx", reason="the model is a flax nnx model")
import jax.numpy as jnp  # noqa: E402

import treeopt as optim  # noqa: E402
import treeopt.jax as tj  # noqa: E402

optax_muon = getattr(optax, "muon", None) or optax.contrib.muon
Dims = getattr(optax, "MuonDimensionNumbers", None) or optax.contrib.MuonDimensionNumbers

LR, WD = 0.02, 0.1
X = jnp.asarray(np.random.default_rng(0).standard_normal((8, 5, 5, 2)), jnp.float32)


class ConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, kernel_size=(3, 3), rngs=rngs)  # kernel (3, 3, 2, 4): 18 in, 4 out
        self.wide = nnx.Linear(4, 24, rngs=rngs)  # (4, 24): fan_out > fan_in, scaled by sqrt(6)
        self.head = nnx.Linear(24, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x)).mean(axis=(1, 2))
        return self.head(jnp.tanh(self.wide(x)))


def loss(model):
    return jnp.mean((model(X) - 1.0) ** 2)


def optax_dims(params):
    """optax's description of flax's layouts: every axis but the last is reduced."""

    def dims(w):
        return Dims(tuple(range(w.ndim - 1)), w.ndim - 1) if w.ndim >= 2 else None

    return jax.tree.map(dims, params)


def train(tx, steps):
    model = ConvNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(loss)(model))

    for _ in range(steps):
        step(model, optimizer)
    return {".".join(map(str, path)): np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def ours(**muon_options):
    """Muon on the kernels; the biases stay put (optax sends them to its Adam, here at lr 0)."""
    return optim.MultiOptimizer(
        [optim.Muon(LR, weight_decay=WD, decoupled_weight_decay=True, allow=["heads"], **muon_options), optim.SGD(0.0)],
        [lambda path, w: path.endswith("kernel")],
    )


def theirs(nesterov, **options):
    return optax_muon(
        LR,
        eps=1e-7,
        weight_decay=WD,
        nesterov=nesterov,
        adam_learning_rate=0.0,
        muon_weight_dimension_numbers=optax_dims,
        **options,
    )


def assert_kernels_match(a, b, start):
    for name in a:
        if name.endswith("kernel"):
            assert not np.allclose(a[name], start[name], atol=1e-4), f"{name} did not move"
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], start[name], err_msg=name)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_flax_model_matches_optax_muon(adjust):
    # optax bias-corrects its momentum; without Nesterov that scales the Newton-Schulz input,
    # which the normalisation removes, so the runs agree step for step
    options = {"consistent_rms": 0.2} if adjust == "match_rms_adamw" else {}
    start = train(optax.sgd(0.0), 0)
    a = train(tj.as_optax(ours(nesterov=False, adjust_lr=adjust)), 5)
    b = train(theirs(False, **options), 5)
    assert_kernels_match(a, b, start)


def test_flax_model_matches_optax_muon_with_nesterov_on_the_first_step():
    # with Nesterov optax's bias corrections mix gradient and momentum in another proportion
    # from the second step on; the first step is the same direction
    start = train(optax.sgd(0.0), 0)
    assert_kernels_match(train(tj.as_optax(ours()), 1), train(theirs(True), 1), start)


def test_mlx_layout_on_flax_kernels_is_what_optax_does_not():
    start = train(optax.sgd(0.0), 0)
    reference = train(theirs(False), 3)
    wrong = train(tj.as_optax(ours(nesterov=False, layout="out_in")), 3)
    assert not np.allclose(wrong["wide.kernel"], reference["wide.kernel"], atol=1e-3)
    assert not np.allclose(wrong["conv.kernel"], reference["conv.kernel"], atol=1e-3)
    assert not np.allclose(start["conv.kernel"], reference["conv.kernel"], atol=1e-3)
