"""Operations on the whole model, across every group of a ``MultiOptimizer``: global-norm
clipping, skipping non-finite steps, and gradient accumulation with per-group frequencies.

They run between the step's checks and its commit (see :mod:`treeopt.engine`): gradients are
rescaled or accumulated here, and their own state (the last norm, the count of skipped
steps, the accumulation buffers) is written only when the step commits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from treeopt.clip import clip_factor, global_norm, scale
from treeopt.errors import TreeoptError
from treeopt.ops import all_finite, cast
from treeopt.types import Array

if TYPE_CHECKING:
    from treeopt.engine import Pair
    from treeopt.multi import MultiOptimizer
    from treeopt.optimizer import Optimizer


@dataclass(frozen=True)
class Options:
    max_grad_norm: float | None = None
    skip_nonfinite: bool = False
    accumulate: tuple[int, ...] = ()  # update frequency of each optimizer (all 1: no accumulation)

    def __init__(
        self,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        accumulate: int | Sequence[int] = 1,
        groups: int = 1,
    ) -> None:
        if max_grad_norm is not None and not max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm should be >=0, {max_grad_norm} was provided instead")
        counts = [accumulate] * groups if isinstance(accumulate, int) else list(accumulate)
        if len(counts) != groups or not all(isinstance(n, int) and n >= 1 for n in counts):
            raise ValueError(f"accumulate must be an integer >= 1 or one per optimizer ({groups}), got {accumulate!r}")
        object.__setattr__(self, "max_grad_norm", max_grad_norm)
        object.__setattr__(self, "skip_nonfinite", bool(skip_nonfinite))
        object.__setattr__(self, "accumulate", tuple(counts))

    @property
    def accumulating(self) -> bool:
        return any(n > 1 for n in self.accumulate)

    @property
    def active(self) -> bool:
        return self.max_grad_norm is not None or self.skip_nonfinite or self.accumulating


def _concrete(flag, option):
    try:
        return bool(flag)
    except Exception as error:  # a tracer inside jax.jit or mx.compile
        raise TreeoptError(
            f"MultiOptimizer({option}=...) decides in Python whether to step, so it cannot "
            "run inside jax.jit or mx.compile; use optax.apply_if_finite / optax.MultiSteps "
            "there"
        ) from error


def prepare(
    multi: MultiOptimizer, leaves: list[Pair], owners: list[Optimizer | None], groups: Sequence[int]
) -> tuple[list[Pair], list[Optimizer | None], list[Optimizer], Callable[[], None] | None]:
    """The leaves and owners to update this call, the optimizers that step, and a commit;
    ``groups`` holds the index of each leaf's optimizer in ``multi``."""
    options, state = multi.whole_model, multi.state
    stepping = multi.stateful()
    if not options.active:
        return leaves, owners, stepping, None
    updates = {}  # entries of the multi's state, written at commit

    shared = getattr(multi, "shared_norm", None)
    if (options.max_grad_norm is not None or options.skip_nonfinite) and (leaves or shared is not None):
        # under ZeRO-1 a rank updates only its own parameters, but the norm and the skip
        # decision are the whole model's: treeopt.distributed hands them in
        norm = global_norm([leaf.grad for leaf in leaves]) if shared is None else shared()
        updates["grad_norm"] = norm
        if options.skip_nonfinite and not _concrete(all_finite(norm), "skip_nonfinite"):
            updates["skipped_steps"] = state.get("skipped_steps", 0) + 1
            return [], [], [], lambda: state.update(updates)
        if options.max_grad_norm is not None:
            factor = clip_factor(norm, options.max_grad_norm)
            for leaf in leaves:
                leaf.grad = scale(leaf.grad, factor)

    if options.accumulating:
        micro = state.get("micro_step", 0)
        due = [(micro + 1) % n == 0 for n in options.accumulate]
        buffers = dict(state.get("accumulated", {}))
        kept = []
        for leaf, owner, group in zip(leaves, owners, groups):
            count = options.accumulate[group]
            if count == 1:
                kept.append((leaf, owner))
                continue
            if leaf.path in buffers:
                _check_buffer(buffers[leaf.path], leaf)
            total = leaf.grad if leaf.path not in buffers else buffers[leaf.path] + leaf.grad
            if due[group]:
                leaf.grad = total * cast(1 / count, total)
                buffers.pop(leaf.path, None)
                kept.append((leaf, owner))
            else:
                buffers[leaf.path] = total
        leaves, owners = [leaf for leaf, _ in kept], [owner for _, owner in kept]
        stepping = [o for i, child in enumerate(multi.optimizers) if due[i] for o in child.stateful()]
        updates["micro_step"] = micro + 1
        updates["accumulated"] = buffers
    return leaves, owners, stepping, lambda: state.update(updates)


def _check_buffer(buffer: Array, leaf: Pair) -> None:
    """An accumulation buffer (perhaps loaded from a checkpoint) must be of its gradient's
    library, shape and dtype: never broadcast."""
    from treeopt.backends import backend_of
    from treeopt.errors import ParameterError, describe

    backend = backend_of(buffer)
    found = (
        getattr(backend, "name", type(buffer).__name__),
        tuple(backend.shape(buffer)) if backend else None,
        backend.dtype_name(buffer) if backend else None,
    )
    expected = (leaf.backend.name, tuple(leaf.backend.shape(leaf.grad)), leaf.backend.dtype_name(leaf.grad))
    if found != expected:
        raise ParameterError(
            f"MultiOptimizer: the accumulated gradient of {describe(leaf.path)} is a {found[0]} "
            f"{found[2]} array of shape {found[1]}, but the gradient is a {expected[0]} {expected[2]} "
            f"array of shape {expected[1]}",
            leaf.path,
        )
