"""Clipping gradients by their global norm."""

from __future__ import annotations

from collections.abc import Sequence

from treeopt.backends import backend_of, numpy_backend
from treeopt.errors import ParameterError
from treeopt.ops import astype, dtype_name, minimum, sqrt, total
from treeopt.tree import tree_flatten, tree_map
from treeopt.types import Array, Tree


def clip_grad_norm(grads: Tree, max_norm: float) -> tuple[Tree, Array]:
    r"""Scale ``grads`` so that their global L2 norm is at most ``max_norm``.

    .. math::

        \|g\| = \sqrt{\textstyle\sum_{\text{leaves}} \sum g^2}, \qquad
        g \leftarrow g \cdot \min\!\left(\frac{\text{max\_norm}}{\|g\| + 10^{-6}}, 1\right)

    float16 leaves are squared and summed in float32. Floating leaves keep their dtype,
    integer leaves come back as float32, ``None`` leaves stay ``None``.

    Args:
        grads: a tree of gradient arrays.
        max_norm (float): the largest norm allowed, >= 0.

    Returns:
        ``(clipped_grads, total_norm)``, where ``total_norm`` is the norm before clipping.

    Example:
        >>> import numpy as np
        >>> clipped, norm = clip_grad_norm({"w": np.array([3.0, 4.0], np.float32)}, 1.0)
        >>> float(norm), [round(float(g), 4) for g in clipped["w"]]
        (5.0, [0.6, 0.8])
    """
    if max_norm < 0:
        raise ValueError(f"max_norm should be >=0, {max_norm} was provided instead")
    leaves = [(path, g) for path, g in tree_flatten(grads) if g is not None]
    libraries: dict = {}
    for path, g in leaves:
        backend = backend_of(g)
        if backend is None or backend.name == "python":
            raise ParameterError(
                f"clip_grad_norm: the gradient at {path!r} is a {type(g).__name__}, not an array", path
            )
        libraries.setdefault(backend.name, path)
    if len(libraries) > 1:
        (first, a), (second, b) = list(libraries.items())[:2]
        raise ParameterError(f"clip_grad_norm: {b!r} is a {second} array but {a!r} is a {first} array", b)

    if not leaves:
        return tree_map(lambda g: g, grads), numpy_backend.scalar_array(0.0, "float32")
    norm = global_norm([g for _, g in leaves])
    factor = clip_factor(norm, max_norm)
    return tree_map(lambda g: None if g is None else scale(g, factor), grads), norm


def global_norm(grads: Sequence[Array]) -> Array:
    """The L2 norm of all ``grads`` together (float16 and integers squared in float32)."""
    squared = 0.0
    for g in grads:
        if dtype_name(g) == "float16" or not _is_floating(g):
            g = astype(g, "float32")  # float16 squares overflow (bfloat16 has float32's range)
        squared = squared + total(g * g)
    return sqrt(squared)


def clip_factor(norm: Array, max_norm: float) -> Array:
    """The factor that brings ``norm`` down to ``max_norm`` (1 when it is already below)."""
    return minimum(max_norm / (norm + 1e-6), 1.0)


def scale(g: Array, factor: Array) -> Array:
    """``g * factor``, cast back to ``g``'s dtype (integers become float32)."""
    if _is_floating(g):
        return astype(g * factor, dtype_name(g))
    return astype(g, "float32") * factor


def _is_floating(g: Array) -> bool:
    backend = backend_of(g)
    if backend is None:
        raise TypeError(f"expected an array, got {type(g).__name__}")
    return backend.is_floating(g)
