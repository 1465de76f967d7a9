"""Arrays of every library from NumPy data, and back, for tests that run on every backend."""

import importlib.util

import numpy as np
import pytest

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - a test dependency
    ml_dtypes = None

BACKENDS = ["numpy", "torch", "jax", "mlx"]
DTYPES = ["float32", "float16", "bfloat16"]


def available(name):
    module = {"numpy": "numpy", "torch": "torch", "jax": "jax", "mlx": "mlx.core"}[name]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def backend_params(names=BACKENDS):
    """pytest params for backends; one whose library is not installed is skipped with a reason."""
    return [pytest.param(n, marks=pytest.mark.skipif(not available(n), reason=f"{n} is not installed")) for n in names]


def np_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def make(data, backend, dtype="float32"):
    """``data`` (anything NumPy takes) as an array of ``backend`` with ``dtype``."""
    data = np.asarray(data, dtype=np.float32)
    if backend == "numpy":
        return data.astype(np_dtype(dtype))
    if backend == "torch":
        import torch

        return torch.from_numpy(data.copy()).to(getattr(torch, dtype))
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(data).astype(dtype)
    if backend == "mlx":
        import mlx.core as mx

        return mx.array(data).astype(getattr(mx, dtype))
    raise ValueError(backend)


def as_float64(x):
    """Any array (or number) as a float64 NumPy array, for comparisons."""
    from treeopt.backends import backend_of

    backend = backend_of(x)
    if backend is None:
        raise TypeError(f"not an array: {type(x).__name__}")
    if backend.name == "python":
        return np.asarray(x, dtype=np.float64)
    return np.asarray(backend.to_numpy(x)).astype(np.float64)


def to_backend_tree(tree, backend, dtype="float32"):
    from treeopt.tree import tree_map

    return tree_map(lambda x: make(x, backend, dtype), tree)


#: (rtol, atol) for results that should equal MLX's up to the dtype's rounding
TOLERANCE = {
    "float32": (2e-5, 2e-6),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.6e-2, 1.6e-2),
}
