"""Same-shape tensors updated together: a *stackable* rule (Muon) runs once on their stack
instead of once per tensor, so its matrix products run batched (one BLAS loop, one
``torch.bmm``, one batched ``dot`` in XLA) and its per-call overhead is paid once.

The rule itself does the work (``update(..., stacked=True)``, see
:class:`treeopt.rules.base.Rule`); this module only decides which tensors share a call:

- tensors are grouped by shape and slot names, in the order they come;
- NumPy arrays are stacked a chunk at a time, each stacked array about :data:`CHUNK_BYTES`,
  so the rule's temporaries stay in cache (NumPy's elementwise operations run on one thread);
  a tensor bigger than that runs alone (stacking would only add a copy);
- torch (whose every operation is a parallel region on CPU: fewer, bigger ones cost less),
  traced or lazy arrays (JAX, MLX) and accelerators take the whole group in one stack.

Float32 results equal the per-tensor rule's up to the summation order of the matrix
products (NumPy: exactly, each matrix gets the same BLAS call).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from treeopt.types import Array

if TYPE_CHECKING:
    from treeopt.backends import Backend

#: bytes of one stacked NumPy array (the rule makes a few temporaries of it)
CHUNK_BYTES = 1 << 19


def groups_by_shape(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices of ``keys`` (a shape, or any hashable that must match) grouped by equal key,
    in order of first appearance."""
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def chunk_length(backend: Backend, like: Array, count: int) -> int:
    """How many tensors like ``like`` to stack per call, for a group of ``count``."""
    if backend.name == "numpy":
        size = max(1, int(backend.nbytes(like)))
        return max(1, min(count, CHUNK_BYTES // size))
    return count


def chunks(backend: Backend, like: Array, indices: list[int]) -> list[list[int]]:
    """``indices`` (one group) cut into the runs that share a call."""
    length = chunk_length(backend, like, len(indices))
    return [indices[start : start + length] for start in range(0, len(indices), length)]


def update_stacked(
    update: Callable[..., tuple[Array, ...]],
    coefficients: dict[str, Any],
    backend: Backend,
    grads: Sequence[Array],
    params: Sequence[Array],
    slots: Sequence[Sequence[Array]],
    buffers: Sequence[Array | None] | None = None,
) -> tuple[Array, ...]:
    """``update`` on the stacks of ``grads``, ``params`` and each slot (``slots``: one list of
    arrays per slot name): ``(new params, *new slots)``, each stacked along the first axis.
    ``buffers`` (optional, one array per stack) receive the stacks on libraries that write
    in place."""
    inputs = [grads, params, *slots]
    buffers = buffers or [None] * len(inputs)
    stacks = [backend.stack(arrays, out=fitting(backend, buffer, arrays)) for arrays, buffer in zip(inputs, buffers)]
    with backend.quiet():
        return update(*stacks, **coefficients, stacked=True)


def fitting(backend: Backend, buffer: Array | None, arrays: Sequence[Array]) -> Array | None:
    """``buffer`` if it has the shape of ``arrays``' stack, else None: a slot may be smaller
    than its parameter (NorMuon's one value per neuron), and buffers are cut to parameters."""
    if buffer is None or tuple(backend.shape(buffer)) != (len(arrays),) + tuple(backend.shape(arrays[0])):
        return None
    return buffer
