"""The math functions the rules are written with.

Each dispatches on its first array argument to that array's backend, so one rule runs on
NumPy, torch, JAX and MLX arrays, and on plain Python numbers. The fast runners rebind
these names (e.g. to NumPy scalar functions inside numba) without touching the rules.
Arithmetic operators (``+ - * / @``) need no function: every backend's arrays have them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from treeopt.backends import Backend, backend_of
from treeopt.types import Array, Scalar

__all__ = [
    "astype",
    "cast",
    "sqrt",
    "rsqrt",
    "sign",
    "maximum",
    "minimum",
    "where",
    "cos",
    "floor",
    "mean",
    "total",
    "swap_last",
    "concatenate",
    "matmul",
    "addmm",
    "all_finite",
    "on_whole",
    "ELEMENTWISE",
]

#: the functions an elementwise rule may call: each has a scalar form, so a compiled loop can
#: run the rule one element at a time (``treeopt.kernels.numba_kernels.SCALAR_OPS``)
ELEMENTWISE = ("sqrt", "rsqrt", "sign", "maximum", "minimum", "where", "cos")


def _of(*xs: Scalar) -> Backend:
    for x in xs:
        backend = backend_of(x)
        if backend is not None and backend.name != "python":
            return backend
    backend = backend_of(xs[0])
    if backend is None:
        raise TypeError(f"expected an array or a number, got {type(xs[0]).__name__}")
    return backend


def astype(x: Scalar, dtype: str) -> Array:
    """``x`` converted to the dtype named ``dtype`` (e.g. ``"float32"``)."""
    return _of(x).astype(x, dtype)


def dtype_name(x: Array) -> str:
    return _of(x).dtype_name(x)


def cast(value: Scalar, like: Array) -> Scalar:
    """``value`` (a number or array) in ``like``'s dtype, so combining them never promotes."""
    return _of(like).cast(value, like)


def sqrt(x: Array) -> Array:
    return _of(x).sqrt(x)


def rsqrt(x: Array) -> Array:
    return _of(x).rsqrt(x)


def sign(x: Array) -> Array:
    return _of(x).sign(x)


def maximum(a: Scalar, b: Scalar) -> Array:
    return _of(a, b).maximum(a, b)


def minimum(a: Scalar, b: Scalar) -> Array:
    return _of(a, b).minimum(a, b)


def where(cond: Array, a: Scalar, b: Scalar) -> Array:
    return _of(cond, a, b).where(cond, a, b)


def cos(x: Array) -> Array:
    return _of(x).cos(x)


def floor(x: Array) -> Array:
    """The largest integer not above ``x``, elementwise (the state formats' codes)."""
    return _of(x).floor(x)


def mean(x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
    return _of(x).mean(x, axis=axis, keepdims=keepdims)


def total(x: Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Array:
    """The sum of all elements, or along ``axis`` (an int or a tuple of ints)."""
    return _of(x).sum(x, axis=axis, keepdims=keepdims)


def matmul(a: Array, b: Array) -> Array:
    return _of(a).matmul(a, b)


def addmm(c: Array, a: Array, b: Array, alpha: float = 1.0, beta: float = 1.0) -> Array:
    """``beta * c + alpha * (a @ b)``, as a GEMM computes it: ``beta * c`` in the dtype, the
    product accumulated in float32 (or wider) and the sum rounded once (MLX's ``addmm`` of
    ``beta * c``). ``alpha`` and ``beta`` are Python floats."""
    return _of(a).addmm(c, a, b, alpha, beta)


def swap_last(x: Array) -> Array:
    return _of(x).swap_last(x)


def concatenate(arrays: Sequence[Array], axis: int) -> Array:
    """``arrays`` (of one library) joined along the existing ``axis``."""
    return _of(arrays[0]).concatenate(arrays, axis)


def all_finite(x: Array) -> Array:
    return _of(x).all_finite(x)


def on_whole(fn: Callable[[Array], Array], x: Array) -> Array:
    """``fn(x)`` where ``fn`` needs all of ``x`` at once (Newton-Schulz): on an array split
    across devices, ``fn`` runs on the gathered whole and the result is split back as ``x``
    is, so every placement computes the same numbers."""
    return _of(x).on_whole(fn, x)
