"""Models, training loops and comparisons shared by the checkpoint tests (test_checkpoint,
test_checkpoint_format, test_checkpoint_files, test_checkpoint_mlx_layout, test_torch_state_dict)."""

import os

import numpy as np
import pytest

import treeopt as optim
from arrays import BACKENDS, available, make
from treeopt import checkpoint
from treeopt.backends import backend_of
from treeopt.tree import tree_flatten, tree_map

HERE = os.path.dirname(os.path.abspath(__file__))


def model_values(seed=0):
    """The model's parameter values, as NumPy float32 (a nested tree with lists)."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "embed": {"weight": r(10, 8)},
        "layers": [{"attn": {"weight": r(8, 8), "bias": r(8)}, "mlp": {"weight": r(16, 8)}} for _ in range(2)],
        "norm": {"scale": r(8)},
        "head": {"weight": r(4, 8)},
    }


def on(tree, backend, dtype="float32"):
    """A NumPy tree as a fresh tree of ``backend`` arrays (new containers, new arrays)."""
    if isinstance(tree, dict):
        return {k: on(v, backend, dtype) for k, v in tree.items()}
    if isinstance(tree, list):
        return [on(v, backend, dtype) for v in tree]
    return make(tree, backend, dtype)


def grads_for(values, step, backend, nonfinite=False):
    """Deterministic gradients for step ``step`` (a NaN in one leaf with ``nonfinite``)."""
    rng = np.random.default_rng(1000 + step)
    out = tree_map(lambda v: (rng.standard_normal(v.shape) * 0.1).astype(np.float32), values)
    if nonfinite:
        out["norm"]["scale"][0] = np.nan
    return on(out, backend)


def is_layer_matrix(path, weight):
    return path.startswith("layers.") and len(weight.shape) == 2


def not_layer_matrix(path, weight):
    return not is_layer_matrix(path, weight)


def muon_adamw(**options):
    """Muon for the layers' matrices, AdamW (scheduled learning rate and weight decay) for the rest."""
    return optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(optim.cosine_decay(3e-3, 10), weight_decay=optim.linear_schedule(0.0, 0.1, 10))],
        [is_layer_matrix],
        **options,
    )


def train(opt, params, backend, steps, start=0, nonfinite_at=()):
    for step in range(start, start + steps):
        opt.update(params, grads_for(model_values(), step, backend, nonfinite=step in nonfinite_at))
    return params


def numpy_of(x):
    backend = backend_of(x)
    if backend.name == "python":
        return np.asarray(x)
    return np.array(backend.to_numpy(x), copy=True)


def flat(tree):
    """``{path: NumPy copy}`` of every array leaf of a tree (ints kept as they are)."""
    return {k: (v if isinstance(v, (int, float)) else numpy_of(v)) for k, v in tree_flatten(tree)}


def snapshot(opt):
    """A deep copy of the whole state: tree_flatten + NumPy copies, dtypes kept."""
    return flat(opt.state)


def assert_bit_identical(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape, (key, x.dtype, y.dtype, x.shape, y.shape)
            assert x.tobytes() == y.tobytes(), key
        else:
            assert x == y, key


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for key in a:
        np.testing.assert_allclose(
            np.asarray(a[key], np.float64), np.asarray(b[key], np.float64), rtol=rtol, atol=atol, err_msg=key
        )


def state_by_key(opt):
    """The state as the checkpoint sees it, ``{"path/slot" or "@name/scalar": NumPy copy}``."""
    tensors, _ = checkpoint.to_flat(opt)
    return {k: numpy_of(v) for k, v in tensors.items()}


def slots_by_path(opt):
    """Only the parameters' slots (``"path/slot"``), independent of optimizer names."""
    return {k: v for k, v in state_by_key(opt).items() if not k.startswith(("@", "#"))}


def child(opt, type_name):
    return next(o for o in opt.optimizers if type(o).__name__ == type_name)


PAIRS = [
    pytest.param(
        s,
        d,
        id=f"{s}-to-{d}",
        marks=pytest.mark.skipif(not (available(s) and available(d)), reason=f"{s} or {d} is not installed"),
    )
    for s in BACKENDS
    for d in BACKENDS
]


needs_torch = pytest.mark.skipif(not available("torch"), reason="torch is not installed")
