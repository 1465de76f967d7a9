"""MLX arrays. Arrays are immutable: new values are rebound.

MLX's Linux wheel multiplies matrices with a reference BLAS, about 15x slower than the
OpenBLAS NumPy ships; on Linux's CPU device, float32/float64 products of evaluated arrays
(Muon's Newton-Schulz) run in NumPy on zero-copy views instead (``HOST_BLAS``). Inside
``mx.compile`` arrays cannot be viewed, and MLX's own products are used.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from treeopt.backends.base import Backend
from treeopt.types import Array, Scalar

#: run float32/float64 matrix products through NumPy's BLAS (Linux CPU only)
HOST_BLAS = sys.platform.startswith("linux")


def _host(*arrays):
    """NumPy views of ``arrays`` when the products should run on the host BLAS, else None."""
    if not HOST_BLAS or arrays[0].dtype not in (mx.float32, mx.float64) or mx.default_device() != mx.cpu:
        return None
    try:
        return [np.asarray(a) for a in arrays]
    except ValueError:  # inside mx.compile: arrays cannot be evaluated
        return None


class MlxBackend(Backend):
    name = "mlx"

    def owns(self, x: object) -> bool:
        return isinstance(x, mx.array)

    def dtype_name(self, x: Array) -> str:
        return str(x.dtype).rpartition(".")[2]

    def device(self, x: Array) -> str:
        return "mlx"

    def zeros_like(self, x: Array) -> Array:
        return mx.zeros_like(x)

    def zeros(self, shape: Sequence[int], like: Array) -> Array:
        return mx.zeros(shape, dtype=like.dtype)

    def scalar_array(self, value: Scalar, dtype: str, like: Array | None = None) -> Array:
        if isinstance(value, np.ndarray):
            value = value.item()
        return mx.array(value, dtype=getattr(mx, dtype))

    def cast(self, x: Scalar, like: Array) -> Scalar:
        if isinstance(x, mx.array):
            return x.astype(like.dtype)
        return float(x)  # MLX treats Python floats as weakly typed: no promotion

    def astype(self, x: Scalar, dtype: str) -> Array:
        return x.astype(getattr(mx, dtype))

    def to_numpy(self, x: Array) -> np.ndarray:
        if x.dtype == mx.bfloat16:
            # optional: bfloat16 arrays (treeopt[bfloat16])
            import ml_dtypes

            return np.array(x.view(mx.uint16)).view(ml_dtypes.bfloat16)
        return np.array(x)

    def from_numpy(self, a: np.ndarray, like: Array | None = None) -> Array:
        array = mx.array(a)
        return array if like is None else array.astype(like.dtype)

    def to_float(self, x: Scalar) -> float:
        return x.item()

    def sqrt(self, x: Array) -> Array:
        return mx.sqrt(x)

    def rsqrt(self, x: Array) -> Array:
        return mx.rsqrt(x)

    def sign(self, x: Array) -> Array:
        return mx.sign(x)

    def maximum(self, a: Scalar, b: Scalar) -> Array:
        return mx.maximum(a, b)

    def minimum(self, a: Scalar, b: Scalar) -> Array:
        return mx.minimum(a, b)

    def where(self, cond: Array, a: Scalar, b: Scalar) -> Array:
        return mx.where(cond, a, b)

    def cos(self, x: Array) -> Array:
        return mx.cos(x)

    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        return mx.mean(x, axis=axis, keepdims=keepdims)

    def sum(self, x: Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Array:
        return mx.sum(x, axis=axis, keepdims=keepdims)

    def stack(self, arrays: Sequence[Array], out: Array | None = None) -> Array:
        return mx.stack(list(arrays))

    def matmul(self, a: Array, b: Array) -> Array:
        host = _host(a, b)
        return mx.array(np.matmul(*host)) if host is not None else a @ b

    def addmm(self, c: Array, a: Array, b: Array, alpha: float = 1.0, beta: float = 1.0) -> Array:
        host = _host(c, a, b)
        if host is not None:
            product = np.matmul(host[1], host[2])
            if alpha != 1.0:
                product *= product.dtype.type(alpha)
            product += host[0] if beta == 1.0 else host[0] * host[0].dtype.type(beta)
            return mx.array(product)
        return mx.addmm(c if beta == 1.0 else beta * c, a, b, alpha=alpha)  # as mlx.optimizers.Muon

    def swap_last(self, x: Array) -> Array:
        return mx.swapaxes(x, -1, -2)

    def concatenate(self, arrays: Sequence[Array], axis: int) -> Array:
        return mx.concatenate(list(arrays), axis=axis)

    def all_finite(self, x: Array) -> Array:
        return mx.all(mx.isfinite(x))

    # --- stored forms of state
    def zeros_of(self, shape: Sequence[int], dtype: str, like: Array) -> Array:
        return mx.zeros(shape, dtype=getattr(mx, dtype))

    def floor(self, x: Array) -> Array:
        return mx.floor(x)

    def max_last(self, x: Array) -> Array:
        return mx.max(x, axis=-1)

    def pad_last(self, x: Array, count: int) -> Array:
        return mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, count)])

    def arange_of(self, count: int, dtype: str, like: Array) -> Array:
        return mx.arange(count, dtype=getattr(mx, dtype))

    def round_bfloat16(self, x: Array, bits: Array) -> Array:
        rounded = (x.view(mx.uint32) + bits.astype(mx.uint32)) & 0xFFFF0000
        return mx.where(mx.isnan(x), x, rounded.view(mx.float32)).astype(mx.bfloat16)
