"""JAX arrays (and tracers under ``jax.jit``). Arrays are immutable: new values are rebound."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from treeopt.backends.base import Backend
from treeopt.types import Array, Scalar

_HALF = ("float16", "bfloat16")
_REPLICATED = jax.sharding.PartitionSpec()
#: tensors stacked or unstacked by one operation under jit (see ``stack``, ``unstack``)
_CHUNK = 64


def _dtype(name):
    if name == "uint64" and not jax.config.jax_enable_x64:  # type: ignore[attr-defined]  # not in jax's stubs
        return jnp.uint32  # JAX keeps 32-bit integers unless x64 is enabled
    return jnp.dtype(name)


class JaxBackend(Backend):
    name = "jax"

    def owns(self, x: object) -> bool:
        return isinstance(x, jax.Array)

    def dtype_name(self, x: Array) -> str:
        return x.dtype.name

    def device(self, x: Array) -> str:
        if isinstance(x, jax.core.Tracer):
            # a tracer has no device; asking it raises an error whose message scans the whole
            # computation traced so far (a trace over thousands of tensors took quadratic time)
            return "traced"
        try:
            return ",".join(sorted(str(d) for d in x.devices()))
        except Exception:  # anything else without a device
            return "traced"

    def zeros_like(self, x: Array) -> Array:
        return jnp.zeros_like(x)

    def zeros(self, shape: Sequence[int], like: Array) -> Array:
        if tuple(shape) == tuple(like.shape):
            return jnp.zeros_like(like)  # keeps like's sharding: a slot is split as its parameter is
        sharding = getattr(like, "sharding", None)  # a tracer has none: the compiler places it
        if isinstance(sharding, jax.sharding.NamedSharding):
            # another shape (Adafactor's factored slots): one copy per device of like's mesh
            return jnp.zeros(shape, dtype=like.dtype, device=jax.sharding.NamedSharding(sharding.mesh, _REPLICATED))
        return jnp.zeros(shape, dtype=like.dtype)

    def scalar_array(self, value: Scalar, dtype: str, like: Array | None = None) -> Array:
        return jnp.asarray(value, dtype=_dtype(dtype))

    def cast(self, x: Scalar, like: Array) -> Scalar:
        if isinstance(x, jax.Array):
            return x.astype(like.dtype)
        return like.dtype.type(x)  # a NumPy scalar of the dtype: strongly typed, no promotion

    def astype(self, x: Scalar, dtype: str) -> Array:
        return jnp.asarray(x).astype(_dtype(dtype))

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.asarray(x)

    def from_numpy(self, a: np.ndarray, like: Array | None = None) -> Array:
        return jnp.asarray(a) if like is None else jnp.asarray(a, dtype=like.dtype)

    def _in_float32(self, x):
        return x.astype(jnp.float32) if x.dtype.name in _HALF else x

    def sqrt(self, x: Array) -> Array:
        return jnp.sqrt(x)

    def rsqrt(self, x: Array) -> Array:
        return jnp.reciprocal(jnp.sqrt(x))

    def sign(self, x: Array) -> Array:
        return jnp.sign(x)

    def maximum(self, a: Scalar, b: Scalar) -> Array:
        return jnp.maximum(a, b)

    def minimum(self, a: Scalar, b: Scalar) -> Array:
        return jnp.minimum(a, b)

    def where(self, cond: Array, a: Scalar, b: Scalar) -> Array:
        return jnp.where(cond, a, b)

    def cos(self, x: Array) -> Array:
        return jnp.cos(x)

    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        total = jnp.sum(self._in_float32(x), axis=axis, keepdims=keepdims).astype(x.dtype)
        count = x.size if axis is None else x.shape[axis]
        return total * x.dtype.type(1 / count if count else float("nan"))  # empty: NaN, as MLX

    def sum(self, x: Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Array:
        return jnp.sum(self._in_float32(x), axis=axis, keepdims=keepdims).astype(x.dtype)

    def stack(self, arrays: Sequence[Array], out: Array | None = None) -> Array:
        if len(arrays) <= _CHUNK or not any(isinstance(x, jax.core.Tracer) for x in arrays):
            return jnp.stack(arrays)
        # XLA:CPU compiles one concatenation of thousands of operands in time that grows
        # faster than their number; chunks of the same size compile to one shared kernel,
        # and the barrier keeps XLA from merging them back into one concatenation
        chunks = [jnp.stack(arrays[k : k + _CHUNK]) for k in range(0, len(arrays), _CHUNK)]
        return jnp.concatenate(jax.lax.optimization_barrier(chunks))

    def unstack(self, stack: Array) -> list[Array]:
        count = stack.shape[0]
        if count <= _CHUNK or not isinstance(stack, jax.core.Tracer):
            return list(jnp.unstack(stack))
        # Under jit, x[k] is a slice whose offset XLA compiles into a kernel of its own: one
        # kernel per tensor, tens of milliseconds each on XLA:CPU. A gather whose indices are
        # an array constant (two rows, so XLA does not rewrite it into that slice) is the same
        # computation for every k, on another index buffer: XLA compiles it once.
        numbers = jax.lax.GatherDimensionNumbers(
            offset_dims=tuple(range(1, stack.ndim)), collapsed_slice_dims=(0,), start_index_map=(0,)
        )
        size, first = (1, *stack.shape[1:]), (0,) * stack.ndim
        mode = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
        return [
            jax.lax.reshape(
                jax.lax.slice(jax.lax.gather(stack, index, numbers, size, mode=mode), first, size), stack.shape[1:]
            )
            for index in _indices(count)
        ]

    def matmul(self, a: Array, b: Array) -> Array:
        return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)

    def addmm(self, c: Array, a: Array, b: Array, alpha: float = 1.0, beta: float = 1.0) -> Array:
        if beta != 1.0:
            c = c * c.dtype.type(beta)  # rounded in the dtype, as MLX's separate product
        product = jnp.matmul(a, b, preferred_element_type=jnp.float32)
        if alpha != 1.0:
            product = product * jnp.float32(alpha)
        return (product + c.astype(jnp.float32)).astype(a.dtype)

    def swap_last(self, x: Array) -> Array:
        return jnp.swapaxes(x, -1, -2)

    def concatenate(self, arrays: Sequence[Array], axis: int) -> Array:
        return jnp.concatenate(arrays, axis=axis)

    def all_finite(self, x: Array) -> Array:
        return jnp.isfinite(x).all()

    # --- stored forms of state
    def hash_scalar(self, value: int) -> Scalar:
        return np.uint32(value)  # JAX refuses Python ints beyond int32 next to uint32 arrays

    def zeros_of(self, shape: Sequence[int], dtype: str, like: Array) -> Array:
        if tuple(shape) == tuple(like.shape):
            return jnp.zeros_like(like, dtype=_dtype(dtype))  # split as the parameter is
        return jnp.zeros(shape, dtype=_dtype(dtype))

    def floor(self, x: Array) -> Array:
        return jnp.floor(x)

    def max_last(self, x: Array) -> Array:
        return jnp.max(x, axis=-1)

    def pad_last(self, x: Array, count: int) -> Array:
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, count)])

    def arange_of(self, count: int, dtype: str, like: Array) -> Array:
        return jnp.arange(count, dtype=_dtype(dtype))

    def round_bfloat16(self, x: Array, bits: Array) -> Array:
        rounded = (jax.lax.bitcast_convert_type(x, jnp.uint32) + bits.astype(jnp.uint32)) & np.uint32(0xFFFF0000)
        return jnp.where(jnp.isnan(x), x, jax.lax.bitcast_convert_type(rounded, jnp.float32)).astype(jnp.bfloat16)

    def on_whole(self, fn: Callable[[Array], Array], x: Array) -> Array:
        """``fn(x)`` computed on the whole of ``x``, wherever ``x`` is split across devices.

        Under ``jit``: ``x``'s Explicit mesh axes are resharded away (one all-gather gives
        every device the whole array) and ``fn``'s result is resharded back (a slice). If the
        mesh has Auto axes, ``fn`` runs inside ``shard_map`` on the whole, replicated ``x``,
        so the compiler cannot split ``fn``'s own computation (which would add collectives in
        every iteration of Newton-Schulz and change the rounding). Outside ``jit``, ``x`` is
        copied whole to every device and ``fn`` runs op by op on the copies. Each device
        computes exactly what one device would, so the result is the unsharded one.
        """
        mesh, spec = _mesh_of(x)
        if mesh is None:
            return fn(x)
        NamedSharding = jax.sharding.NamedSharding
        if not isinstance(x, jax.core.Tracer):  # outside jit: compute on one full copy per device
            placement = x.sharding
            if not isinstance(placement, NamedSharding):
                return fn(x)
            return jax.device_put(fn(jax.device_put(x, NamedSharding(placement.mesh, _REPLICATED))), placement)
        split = any(axis is not None for axis in spec)  # along Explicit axes (Auto ones are not typed)
        if split:
            x = jax.sharding.reshard(x, NamedSharding(mesh, _REPLICATED))
        if all(kind == jax.sharding.AxisType.Explicit for kind in mesh.axis_types):
            y = fn(x)  # whole operands: every operation stays whole
        else:
            y = jax.shard_map(fn, mesh=mesh, in_specs=_REPLICATED, out_specs=_REPLICATED, check_vma=False)(x)
        return jax.sharding.reshard(y, NamedSharding(mesh, spec)) if split else y


@functools.lru_cache(maxsize=16)
def _indices(count: int) -> list[np.ndarray]:
    """``[[k], [0]]`` for every k < count: the index arrays of :meth:`JaxBackend.unstack`."""
    return [np.array([[k], [0]], np.int32) for k in range(count)]


def _mesh_of(x):
    """``(mesh, spec)`` of an array or tracer split over a mesh of several devices, or
    ``(None, None)``: on one device, or with a JAX too old to type shardings."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None or not hasattr(jax, "shard_map"):
        return None, None
    sharding = getattr(typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or mesh.size == 1:
        return None, None
    if all(kind == jax.sharding.AxisType.Manual for kind in mesh.axis_types):
        return None, None  # inside shard_map: x is this device's own block, as the user chose
    return mesh, sharding.spec  # type: ignore[union-attr]  # a mesh implies a sharding
