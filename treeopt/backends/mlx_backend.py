"""MLX arrays. Arrays are immutable: new values are rebound."""

import mlx.core as mx
import numpy as np

from treeopt.backends.base import Backend


class MlxBackend(Backend):
    name = "mlx"

    def owns(self, x):
        return isinstance(x, mx.array)

    def dtype_name(self, x):
        return str(x.dtype).rpartition(".")[2]

    def device(self, x):
        return "mlx"

    def zeros_like(self, x):
        return mx.zeros_like(x)

    def zeros(self, shape, like):
        return mx.zeros(shape, dtype=like.dtype)

    def scalar_array(self, value, dtype, like=None):
        if isinstance(value, np.ndarray):
            value = value.item()
        return mx.array(value, dtype=getattr(mx, dtype))

    def cast(self, x, like):
        if isinstance(x, mx.array):
            return x.astype(like.dtype)
        return float(x)  # MLX treats Python floats as weakly typed: no promotion

    def astype(self, x, dtype):
        return x.astype(getattr(mx, dtype))

    def to_numpy(self, x):
        if x.dtype == mx.bfloat16:
            import ml_dtypes

            return np.array(x.view(mx.uint16)).view(ml_dtypes.bfloat16)
        return np.array(x)

    def from_numpy(self, a, like=None):
        array = mx.array(a)
        return array if like is None else array.astype(like.dtype)

    def to_float(self, x):
        return x.item()

    def sqrt(self, x):
        return mx.sqrt(x)

    def rsqrt(self, x):
        return mx.rsqrt(x)

    def sign(self, x):
        return mx.sign(x)

    def maximum(self, a, b):
        return mx.maximum(a, b)

    def minimum(self, a, b):
        return mx.minimum(a, b)

    def where(self, cond, a, b):
        return mx.where(cond, a, b)

    def cos(self, x):
        return mx.cos(x)

    def mean(self, x, axis=None, keepdims=False):
        return mx.mean(x, axis=axis, keepdims=keepdims)

    def sum(self, x):
        return mx.sum(x)

    def matmul(self, a, b):
        return a @ b

    def addmm(self, c, a, b, alpha=None):
        return mx.addmm(c, a, b, alpha=1.0 if alpha is None else alpha)

    def swap_last(self, x):
        return mx.swapaxes(x, -1, -2)

    def all_finite(self, x):
        return mx.all(mx.isfinite(x))
