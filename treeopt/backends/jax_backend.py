"""JAX arrays (and tracers under ``jax.jit``). Arrays are immutable: new values are rebound."""

import jax
import jax.numpy as jnp
import numpy as np

from treeopt.backends.base import Backend

_HALF = ("float16", "bfloat16")


def _dtype(name):
    if name == "uint64" and not jax.config.jax_enable_x64:
        return jnp.uint32  # JAX keeps 32-bit integers unless x64 is enabled
    return jnp.dtype(name)


class JaxBackend(Backend):
    name = "jax"

    def owns(self, x):
        return isinstance(x, jax.Array)

    def dtype_name(self, x):
        return x.dtype.name

    def device(self, x):
        try:
            return ",".join(sorted(str(d) for d in x.devices()))
        except Exception:  # a tracer has no device
            return "traced"

    def zeros_like(self, x):
        return jnp.zeros_like(x)

    def zeros(self, shape, like):
        return jnp.zeros(shape, dtype=like.dtype)

    def scalar_array(self, value, dtype, like=None):
        return jnp.asarray(value, dtype=_dtype(dtype))

    def cast(self, x, like):
        if isinstance(x, jax.Array):
            return x.astype(like.dtype)
        return like.dtype.type(x)  # a NumPy scalar of the dtype: strongly typed, no promotion

    def astype(self, x, dtype):
        return jnp.asarray(x).astype(_dtype(dtype))

    def to_numpy(self, x):
        return np.asarray(x)

    def from_numpy(self, a, like=None):
        return jnp.asarray(a) if like is None else jnp.asarray(a, dtype=like.dtype)

    def _in_float32(self, x):
        return x.astype(jnp.float32) if x.dtype.name in _HALF else x

    def sqrt(self, x):
        return jnp.sqrt(x)

    def rsqrt(self, x):
        return jnp.reciprocal(jnp.sqrt(x))

    def sign(self, x):
        return jnp.sign(x)

    def maximum(self, a, b):
        return jnp.maximum(a, b)

    def minimum(self, a, b):
        return jnp.minimum(a, b)

    def where(self, cond, a, b):
        return jnp.where(cond, a, b)

    def cos(self, x):
        return jnp.cos(x)

    def mean(self, x, axis=None, keepdims=False):
        total = jnp.sum(self._in_float32(x), axis=axis, keepdims=keepdims).astype(x.dtype)
        count = x.size if axis is None else x.shape[axis]
        return total * x.dtype.type(1 / count if count else float("nan"))  # empty: NaN, as MLX

    def sum(self, x, axis=None, keepdims=False):
        return jnp.sum(self._in_float32(x), axis=axis, keepdims=keepdims).astype(x.dtype)

    def stack(self, arrays, out=None):
        return jnp.stack(arrays)

    def matmul(self, a, b):
        return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)

    def addmm(self, c, a, b, alpha=1.0, beta=1.0):
        if beta != 1.0:
            c = c * c.dtype.type(beta)  # rounded in the dtype, as MLX's separate product
        product = jnp.matmul(a, b, preferred_element_type=jnp.float32)
        if alpha != 1.0:
            product = product * jnp.float32(alpha)
        return (product + c.astype(jnp.float32)).astype(a.dtype)

    def swap_last(self, x):
        return jnp.swapaxes(x, -1, -2)

    def all_finite(self, x):
        return jnp.isfinite(x).all()
