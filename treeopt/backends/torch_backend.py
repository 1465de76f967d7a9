"""PyTorch tensors, on any device. Tensors are written in place (under ``no_grad``); state
slots are created on the parameter's device and never leave it."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from treeopt.backends.base import Backend
from treeopt.types import Array, Scalar

_HALF = (torch.float16, torch.bfloat16)
_LARGE = 1 << 20  # elements


def _numel(shape):
    count = 1
    for n in shape:
        count *= n
    return count


# torch has no arithmetic on uint64: the step counter is int64 here
_DTYPES = {"uint64": torch.int64}


def _dtype(name):
    return _DTYPES.get(name) or getattr(torch, name)


class TorchBackend(Backend):
    name = "torch"
    mutable = True
    array_types = (torch.Tensor, torch.nn.Parameter)

    def owns(self, x: object) -> bool:
        return isinstance(x, torch.Tensor)

    def dtype_name(self, x: Array) -> str:
        return str(x.dtype).removeprefix("torch.")

    def device(self, x: Array) -> str:
        return str(x.device)

    def zeros_like(self, x: Array) -> Array:
        return self.zeros(tuple(x.shape), x)

    def zeros(self, shape: Sequence[int], like: Array) -> Array:
        if like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64) and _numel(shape) >= _LARGE:
            # through NumPy, whose allocator asks for transparent huge pages for large arrays
            # and torch's does not: streaming a 124M-parameter state is about 10% faster
            return torch.from_numpy(np.zeros(shape, dtype=str(like.dtype).removeprefix("torch.")))
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def scalar_array(self, value: Scalar, dtype: str, like: Array | None = None) -> Array:
        if isinstance(value, np.ndarray):
            value = value.item()
        return torch.tensor(value, dtype=_dtype(dtype), device=None if like is None else like.device)

    def cast(self, x: Scalar, like: Array) -> Scalar:
        if isinstance(x, torch.Tensor):
            return x.to(like.dtype)
        # A Python number rounded to the tensor's dtype: torch then computes exactly what an
        # operation between two tensors of that dtype would.
        if like.dtype == torch.float64:
            return float(x)
        x = float(x)
        return x if x == 0 or x != x else _rounded(x, like.dtype)  # zeros keep their sign, NaN stays

    def astype(self, x: Scalar, dtype: str) -> Array:
        return x.to(_dtype(dtype))

    def writable(self, x: Array) -> bool:
        return isinstance(x, torch.Tensor) and not x.is_inference()

    def write(self, dst: Array, src: Array) -> None:
        with torch.no_grad():
            dst.copy_(src)

    def to_numpy(self, x: Array) -> np.ndarray:
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            # optional: bfloat16 arrays (treeopt[bfloat16])
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()

    def from_numpy(self, a: np.ndarray, like: Array | None = None) -> Array:
        a = np.ascontiguousarray(a)
        if a.dtype.name == "bfloat16":
            tensor = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(a.copy())
        return tensor if like is None else tensor.to(device=like.device, dtype=like.dtype)

    def to_float(self, x: Scalar) -> float:
        return float(x)

    def _in_float32(self, x):
        return x.float() if x.dtype in _HALF else x

    def sqrt(self, x: Array) -> Array:
        # torch's vectorised CPU sqrt is off by an ulp for a fifth of float32 inputs (and some
        # float64 ones); NumPy's, on a zero-copy view, is correctly rounded, as are MLX's, the
        # compiled loops' and CUDA's
        if (
            x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and not x.requires_grad
            and not torch.compiler.is_compiling()
        ):  # compiled: the generated code's sqrt
            return torch.from_numpy(np.asarray(np.sqrt(x.numpy())))
        return torch.sqrt(x)

    def rsqrt(self, x: Array) -> Array:
        return torch.reciprocal(self.sqrt(x))

    def sign(self, x: Array) -> Array:
        return torch.sign(x)

    def maximum(self, a: Scalar, b: Scalar) -> Array:
        if not isinstance(a, torch.Tensor):
            a, b = b, a
        return torch.clamp_min(a, b) if not isinstance(b, torch.Tensor) else torch.maximum(a, b)

    def minimum(self, a: Scalar, b: Scalar) -> Array:
        if not isinstance(a, torch.Tensor):
            a, b = b, a
        return torch.clamp_max(a, b) if not isinstance(b, torch.Tensor) else torch.minimum(a, b)

    def where(self, cond: Array, a: Scalar, b: Scalar) -> Array:
        return torch.where(torch.as_tensor(cond), a, b)

    def cos(self, x: Array) -> Array:
        return torch.cos(x)

    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        dims = () if axis is None else axis
        total = torch.sum(self._in_float32(x), dim=dims, keepdim=keepdims).to(x.dtype)
        count = x.numel() if axis is None else x.shape[axis]
        return total * self.cast(1 / count if count else float("nan"), x)  # empty: NaN, as MLX

    def sum(self, x: Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Array:
        dims = () if axis is None else axis
        return torch.sum(self._in_float32(x), dim=dims, keepdim=keepdims).to(x.dtype)

    def write_stack(self, dsts: Sequence[Array], stack: Array) -> None:
        with torch.no_grad():
            torch._foreach_copy_(list(dsts), list(stack.unbind(0)))  # one call for the whole stack

    def stack(self, arrays: Sequence[Array], out: Array | None = None) -> Array:
        with torch.no_grad():  # parameters require grad; a step is never differentiated
            return torch.stack(list(arrays), out=out)

    def matmul(self, a: Array, b: Array) -> Array:
        return torch.matmul(a, b)

    def addmm(self, c: Array, a: Array, b: Array, alpha: float = 1.0, beta: float = 1.0) -> Array:
        if c.device.type == "cpu" and c.dtype in (torch.float32, torch.float64) and a.ndim in (2, 3):
            # on CPU: torch's baddbmm takes about a third longer than bmm, and every fresh
            # stack-sized temporary costs a pass of page faults; so the product is scaled and
            # summed in place, a single matrix as a stack (one matrix and a stack of them give
            # the same bits, which sharded steps rely on); float32 and float64 round each term
            # apart, within the products' own summation-order differences; half precision keeps
            # MLX's roundings below
            product = torch.bmm(a, b) if a.ndim == 3 else torch.mm(a, b)
            if alpha != 1.0:
                product.mul_(alpha)
            return product.add_(c, alpha=self.cast(beta, c)) if beta != 1.0 else product.add_(c)
        if beta != 1.0:
            c = self.cast(beta, c) * c  # rounded in the dtype, as MLX's separate product
        if a.ndim == 3:  # a stack of matrices
            return torch.baddbmm(c, a, b, alpha=alpha)
        return torch.addmm(c, a, b, alpha=alpha)

    def swap_last(self, x: Array) -> Array:
        return x.transpose(-1, -2)

    def concatenate(self, arrays: Sequence[Array], axis: int) -> Array:
        return torch.cat(list(arrays), dim=axis)

    def all_finite(self, x: Array) -> Array:
        return torch.isfinite(x).all()

    # --- stored forms of state
    hash_dtype = "int64"  # torch has little uint32 arithmetic

    def zeros_of(self, shape: Sequence[int], dtype: str, like: Array) -> Array:
        return torch.zeros(tuple(shape), dtype=_dtype(dtype), device=like.device)

    def floor(self, x: Array) -> Array:
        return torch.floor(x)

    def max_last(self, x: Array) -> Array:
        return torch.amax(x, dim=-1)

    def pad_last(self, x: Array, count: int) -> Array:
        return torch.nn.functional.pad(x, (0, count))

    def arange_of(self, count: int, dtype: str, like: Array) -> Array:
        return torch.arange(count, dtype=_dtype(dtype), device=like.device)

    def round_bfloat16(self, x: Array, bits: Array) -> Array:
        rounded = ((x.view(torch.int32) + bits.to(torch.int32)) & -65536).view(torch.float32)
        return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


@functools.lru_cache(maxsize=1024)
def _rounded(x: float, dtype: torch.dtype) -> float:
    """``x`` rounded to ``dtype`` (remembered: the same few coefficients come every step, and
    making a tensor to round one costs more than the products of a small matrix)."""
    if dtype == torch.bfloat16:
        return torch.tensor(x, dtype=torch.bfloat16).item()
    return float(np.asarray(x, dtype=str(dtype).removeprefix("torch.")))
