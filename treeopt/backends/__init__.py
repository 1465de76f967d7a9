"""Array backends: everything treeopt needs to know about one array library.

Each backend is a small object (see :class:`~treeopt.backends.base.Backend`) that tells
whether an array is its own, makes zeros and scalars like an array, does the few math
functions the rules use, casts, and writes in place where the library allows it.
Nothing else in treeopt imports torch, jax or mlx: a framework backend is loaded only once
that framework has been imported by the user, so ``import treeopt`` needs only NumPy.
"""

from __future__ import annotations

import importlib
import sys

from treeopt.backends.base import Backend, PythonScalars
from treeopt.backends.numpy_backend import NumpyBackend
from treeopt.types import Scalar

__all__ = [
    "Backend",
    "array_backend",
    "as_float",
    "backend_of",
    "default_backend",
    "get_backend",
    "numpy_backend",
    "python_scalars",
]

numpy_backend = NumpyBackend()
python_scalars = PythonScalars()

# Framework backends, by the module whose import makes them possible.
_FRAMEWORKS = {
    "torch": ("torch", "treeopt.backends.torch_backend", "TorchBackend"),
    "jax": ("jax", "treeopt.backends.jax_backend", "JaxBackend"),
    "mlx": ("mlx.core", "treeopt.backends.mlx_backend", "MlxBackend"),
}
_loaded = {"numpy": numpy_backend}
_by_type = {int: python_scalars, float: python_scalars, bool: python_scalars}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (``"numpy"``, ``"torch"``, ``"jax"`` or ``"mlx"``),
    importing its framework."""
    if name not in _loaded:
        if name not in _FRAMEWORKS:
            raise ValueError(f"unknown backend {name!r}; expected one of numpy, torch, jax, mlx")

        framework, module, cls = _FRAMEWORKS[name]
        importlib.import_module(framework)
        _loaded[name] = getattr(importlib.import_module(module), cls)()
    return _loaded[name]


def default_backend() -> Backend:
    """The library of a new optimizer's scalars (step, learning rate), before any parameter is
    seen: MLX's once MLX is loaded, so that ``mx.compile(step, inputs=optimizer.state,
    outputs=optimizer.state)`` captures them as it does with mlx.optimizers; else NumPy's.
    The first step moves them to the parameters' library."""
    return get_backend("mlx") if "mlx.core" in sys.modules else numpy_backend


def _candidates():
    yield numpy_backend
    for name, (framework, _, _) in _FRAMEWORKS.items():
        if framework in sys.modules:  # an array of a framework implies the framework is imported
            yield get_backend(name)


def backend_of(x: object) -> Backend | None:
    """The backend that owns ``x``, or ``None`` when ``x`` is not an array or a number."""
    cls = type(x)
    found = _by_type.get(cls)
    if found is None:
        for candidate in _candidates():
            if candidate.owns(x):
                found = candidate
                break
        else:
            return None
        _by_type[cls] = found
    return found


def array_backend(x: object) -> Backend:
    """The backend of ``x``, known to be an array or a number; a ``TypeError`` otherwise."""
    backend = backend_of(x)
    if backend is None:
        raise TypeError(f"expected an array or a number, got {type(x).__name__}")
    return backend


def as_float(value: Scalar) -> float:
    """A number or a 0-d array of any backend as a Python float."""
    backend = backend_of(value)
    return float(value) if backend is None or backend.name == "python" else backend.to_float(value)
