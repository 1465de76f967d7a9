"""NumPy arrays (bfloat16 through ``ml_dtypes``). Arrays are written in place."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import numpy as np

from treeopt.backends.base import Backend
from treeopt.types import Array, Scalar

_HALF = ("float16", "bfloat16")
_NAMES: dict = {}  # dtype -> its name


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":  # NumPy's bfloat16 comes from ml_dtypes (pip install treeopt[bfloat16])
        try:
            # optional: bfloat16 arrays (treeopt[bfloat16])
            import ml_dtypes
        except ImportError:  # pragma: no cover
            raise TypeError("bfloat16 NumPy arrays need the ml_dtypes package") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class NumpyBackend(Backend):
    name = "numpy"
    array_types = (np.ndarray,)
    mutable = True

    def owns(self, x: object) -> bool:
        return isinstance(x, (np.ndarray, np.generic))

    def dtype_name(self, x: Array) -> str:
        dtype = x.dtype
        name = _NAMES.get(dtype)
        if name is None:  # NumPy builds dtype.name anew on every call (about 10 us)
            name = _NAMES[dtype] = dtype.name
        return name

    def zeros_like(self, x: Array) -> Array:
        return np.zeros(np.shape(x), dtype=x.dtype)

    def zeros(self, shape: Sequence[int], like: Array) -> Array:
        return np.zeros(shape, dtype=like.dtype)

    def scalar_array(self, value: Scalar, dtype: str, like: Array | None = None) -> Array:
        return np.array(value, dtype=_dtype(dtype))

    def cast(self, x: Scalar, like: Array) -> Scalar:
        dtype = like.dtype
        if isinstance(x, (np.ndarray, np.generic)):
            return x.astype(dtype)[()] if x.dtype != dtype else x
        return dtype.type(x)

    def astype(self, x: Scalar, dtype: str) -> Array:
        return np.asarray(x).astype(_dtype(dtype))

    def quiet(self) -> AbstractContextManager[object]:
        return np.errstate(all="ignore")

    def as_array(self, x: Array) -> Array:
        return np.asarray(x) if isinstance(x, np.generic) else x

    def writable(self, x: Array) -> bool:
        return isinstance(x, np.ndarray) and x.flags.writeable

    def write(self, dst: Array, src: Array) -> None:
        np.copyto(dst, src, casting="unsafe")

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.asarray(x)

    def from_numpy(self, a: np.ndarray, like: Array | None = None) -> Array:
        return np.array(a, copy=True) if like is None else np.array(a, dtype=like.dtype, copy=True)

    # ml_dtypes' bfloat16 promotes to float32 in reductions and products; the helpers below
    # compute half types in float32 and round back, as MLX does.
    def _in_float32(self, x):
        return x.astype(np.float32) if x.dtype.name in _HALF else x

    def sqrt(self, x: Array) -> Array:
        return np.sqrt(x)

    def rsqrt(self, x: Array) -> Array:
        return np.reciprocal(np.sqrt(x))

    def sign(self, x: Array) -> Array:
        return np.sign(x)

    def maximum(self, a: Scalar, b: Scalar) -> Array:
        return np.maximum(a, b)

    def minimum(self, a: Scalar, b: Scalar) -> Array:
        return np.minimum(a, b)

    def where(self, cond: Array, a: Scalar, b: Scalar) -> Array:
        return np.where(cond, a, b)

    def cos(self, x: Array) -> Array:
        return np.cos(x)

    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        # MLX's mean: a float32-accumulated sum in the dtype, times 1/n in the dtype
        total = np.sum(self._in_float32(x), axis=axis, keepdims=keepdims).astype(x.dtype)
        count = x.size if axis is None else x.shape[axis]
        return total * x.dtype.type(1 / count if count else float("nan"))  # empty: NaN, as MLX

    def sum(self, x: Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Array:
        return np.sum(self._in_float32(x), axis=axis, keepdims=keepdims).astype(x.dtype)

    def stack(self, arrays: Sequence[Array], out: Array | None = None) -> Array:
        return np.stack(arrays, out=out)

    def matmul(self, a: Array, b: Array) -> Array:
        return np.matmul(a, b).astype(a.dtype, copy=False)

    def addmm(self, c: Array, a: Array, b: Array, alpha: float = 1.0, beta: float = 1.0) -> Array:
        if beta != 1.0:
            c = c * c.dtype.type(beta)  # rounded in the dtype, as MLX's separate product
        if a.dtype.name in _HALF:  # accumulate in float32, round once
            product = np.matmul(a.astype(np.float32), b.astype(np.float32))
            if alpha != 1.0:
                product *= np.float32(alpha)
            return (product + c.astype(np.float32)).astype(a.dtype)
        product = np.matmul(a, b)
        if alpha != 1.0:
            product *= a.dtype.type(alpha)
        product += c
        return product

    def swap_last(self, x: Array) -> Array:
        return np.swapaxes(x, -1, -2)

    def concatenate(self, arrays: Sequence[Array], axis: int) -> Array:
        return np.concatenate(arrays, axis=axis)

    def all_finite(self, x: Array) -> Array:
        return np.isfinite(x).all()

    # --- stored forms of state
    def zeros_of(self, shape: Sequence[int], dtype: str, like: Array) -> Array:
        return np.zeros(shape, dtype=_dtype(dtype))

    def floor(self, x: Array) -> Array:
        return np.floor(x)

    def max_last(self, x: Array) -> Array:
        return np.max(x, axis=-1)

    def pad_last(self, x: Array, count: int) -> Array:
        return np.concatenate([x, np.zeros(x.shape[:-1] + (count,), x.dtype)], axis=-1)

    def arange_of(self, count: int, dtype: str, like: Array) -> Array:
        return np.arange(count, dtype=_dtype(dtype))

    def round_bfloat16(self, x: Array, bits: Array) -> Array:
        rounded = (x.view(np.uint32) + bits.astype(np.uint32)) & np.uint32(0xFFFF0000)
        return np.where(np.isnan(x), x, rounded.view(np.float32)).astype(_dtype("bfloat16"))
