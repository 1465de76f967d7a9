"""The interface every array backend implements, and the one for plain Python numbers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import numpy as np

from treeopt.types import Array, Scalar


class Backend:
    """What treeopt needs from an array library.

    ``mutable`` says whether arrays can be written in place (NumPy, torch); JAX and MLX
    arrays are immutable, so updated values are rebound instead. Math functions take arrays
    of this backend, or Python numbers where noted.
    """

    name: str = "?"
    mutable: bool = False
    #: dtype names of floating types the rules may update
    floating: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
    #: the exact types of this library's arrays, for walks that test ``type(x) in ...``
    array_types: tuple[type, ...] = ()

    # --- what an array is -------------------------------------------------------------
    def owns(self, x: object) -> bool:
        raise NotImplementedError

    def dtype_name(self, x: Array) -> str:
        """The dtype as a plain name: ``float32``, ``bfloat16``, ``uint64``..."""
        raise NotImplementedError

    def is_floating(self, x: Array) -> bool:
        return self.dtype_name(x) in self.floating

    def shape(self, x: Array) -> tuple[int, ...]:
        return tuple(x.shape)

    def device(self, x: Array) -> str:
        return "cpu"

    def nbytes(self, x: Array) -> int:
        return int(x.nbytes)

    # --- making arrays ------------------------------------------------------------------
    def zeros_like(self, x: Array) -> Array:
        raise NotImplementedError

    def zeros(self, shape: Sequence[int], like: Array) -> Array:
        """Zeros of ``shape`` with ``like``'s dtype and device."""
        raise NotImplementedError

    def scalar_array(self, value: Scalar, dtype: str, like: Array | None = None) -> Array:
        """A 0-d array holding ``value`` (a number or 0-d array), on ``like``'s device."""
        raise NotImplementedError

    def cast(self, x: Scalar, like: Array) -> Scalar:
        """``x`` (a number or an array) in ``like``'s dtype, ready to combine with ``like``
        without promotion: the rules see every coefficient in the array's own dtype."""
        raise NotImplementedError

    def astype(self, x: Scalar, dtype: str) -> Array:
        raise NotImplementedError

    def as_array(self, x: Array) -> Array:
        """A result of the rules as an array of this library (NumPy makes 0-d results scalars)."""
        return x

    def quiet(self) -> AbstractContextManager[object]:
        """A context in which the rules run: NumPy's floating-point warnings are off, as
        every other library is silent about them (see ``skip_nonfinite`` to act on them)."""

        return contextlib.nullcontext()

    def writable(self, x: Array) -> bool:
        """Whether ``x`` can be written in place."""
        return False

    def write(self, dst: Array, src: Array) -> None:
        """Write ``src`` into ``dst`` in place (mutable backends only)."""
        raise NotImplementedError(f"{self.name} arrays are immutable")

    def to_numpy(self, x: Array) -> np.ndarray:
        raise NotImplementedError

    def from_numpy(self, a: np.ndarray, like: Array | None = None) -> Array:
        raise NotImplementedError

    def to_float(self, x: Scalar) -> float:
        return float(x)

    # --- math used by the rules ---------------------------------------------------------
    def sqrt(self, x: Array) -> Array:
        raise NotImplementedError

    def rsqrt(self, x: Array) -> Array:
        raise NotImplementedError

    def sign(self, x: Array) -> Array:
        raise NotImplementedError

    def abs(self, x: Array) -> Array:
        return abs(x)

    def maximum(self, a: Scalar, b: Scalar) -> Array:
        raise NotImplementedError

    def minimum(self, a: Scalar, b: Scalar) -> Array:
        raise NotImplementedError

    def where(self, cond: Array, a: Scalar, b: Scalar) -> Array:
        raise NotImplementedError

    def cos(self, x: Array) -> Array:
        raise NotImplementedError

    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        raise NotImplementedError

    def sum(self, x: Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Array:
        raise NotImplementedError

    def write_stack(self, dsts: Sequence[Array], stack: Array) -> None:
        """Write ``stack[k]`` into ``dsts[k]`` for every k (mutable backends only)."""
        for k, dst in enumerate(dsts):
            self.write(dst, stack[k])

    def stack(self, arrays: Sequence[Array], out: Array | None = None) -> Array:
        """``arrays`` (same shape and dtype) stacked along a new first axis, into ``out``
        when given and the library writes in place."""
        raise NotImplementedError

    def unstack(self, stack: Array) -> list[Array]:
        """The arrays of ``stack`` along its first axis (views where the library has them)."""
        return [stack[k] for k in range(self.shape(stack)[0])]

    def matmul(self, a: Array, b: Array) -> Array:
        return a @ b

    def addmm(self, c: Array, a: Array, b: Array, alpha: float = 1.0, beta: float = 1.0) -> Array:
        """``beta * c + alpha * (a @ b)`` (see :func:`treeopt.ops.addmm`)."""
        product = self.matmul(a, b)
        if alpha != 1.0:
            product = self.cast(alpha, product) * product
        return (c if beta == 1.0 else self.cast(beta, c) * c) + product

    def swap_last(self, x: Array) -> Array:
        """``x`` with its last two axes swapped (the matrix transpose)."""
        raise NotImplementedError

    def concatenate(self, arrays: Sequence[Array], axis: int) -> Array:
        """``arrays`` joined along the existing ``axis``."""
        raise NotImplementedError

    def all_finite(self, x: Array) -> Array:
        """A 0-d boolean array: no NaN or infinity in ``x``."""
        raise NotImplementedError

    def on_whole(self, fn: Callable[[Array], Array], x: Array) -> Array:
        """``fn(x)`` computed on the whole array, placed as ``x`` is. Only an array split
        across devices (JAX sharding) needs more than calling ``fn``."""
        return fn(x)

    # --- stored forms of state (treeopt.precision) ------------------------------------------
    #: the integer dtype of the random-bit hash: 32-bit values, or wider ones masked to 32 bits
    #: where the library has no uint32 arithmetic
    hash_dtype: str = "uint32"

    def hash_scalar(self, value: int) -> Scalar:
        """An integer constant of the hash, as the library combines it with ``hash_dtype`` arrays."""
        return value

    def zeros_of(self, shape: Sequence[int], dtype: str, like: Array) -> Array:
        """Zeros of ``shape`` and ``dtype`` on ``like``'s device (placed as ``like`` when the
        shapes agree)."""
        raise NotImplementedError

    def floor(self, x: Array) -> Array:
        raise NotImplementedError

    def max_last(self, x: Array) -> Array:
        """The maximum along the last axis (a NaN anywhere gives NaN)."""
        raise NotImplementedError

    def pad_last(self, x: Array, count: int) -> Array:
        """``x`` with ``count`` zeros appended along its last axis."""
        raise NotImplementedError

    def arange_of(self, count: int, dtype: str, like: Array) -> Array:
        """``0, 1, ..., count - 1`` in ``dtype`` on ``like``'s device."""
        raise NotImplementedError

    def round_bfloat16(self, x: Array, bits: Array) -> Array:
        """float32 ``x`` rounded to bfloat16 after adding ``bits`` (integers in [0, 2^16), of
        ``hash_dtype``) to its bit pattern: stochastic rounding. NaNs stay NaN."""
        raise NotImplementedError


class PythonScalars(Backend):
    """Plain Python numbers, e.g. a schedule evaluated at an integer step."""

    name = "python"

    def owns(self, x: object) -> bool:
        return isinstance(x, (int, float, bool))

    def dtype_name(self, x: Array) -> str:
        return "float64" if isinstance(x, float) else "int64"

    def shape(self, x: Array) -> tuple[int, ...]:
        return ()

    def cast(self, x: Scalar, like: Array) -> Scalar:
        return float(x)

    def astype(self, x: Scalar, dtype: str) -> Array:
        return float(x) if dtype.startswith(("float", "bfloat")) else int(x)

    def sqrt(self, x: Array) -> Array:
        return math.sqrt(x)

    def rsqrt(self, x: Array) -> Array:
        return 1.0 / math.sqrt(x)

    def sign(self, x: Array) -> Array:
        return float((x > 0) - (x < 0))

    def maximum(self, a: Scalar, b: Scalar) -> Array:
        return max(a, b)

    def minimum(self, a: Scalar, b: Scalar) -> Array:
        return min(a, b)

    def where(self, cond: Array, a: Scalar, b: Scalar) -> Array:
        return a if cond else b

    def cos(self, x: Array) -> Array:
        return math.cos(x)

    def all_finite(self, x: Array) -> Array:
        return math.isfinite(x)
