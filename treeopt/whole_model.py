"""Operations on the whole model, across every group of a ``MultiOptimizer``: global-norm
clipping, skipping non-finite steps, and gradient accumulation with per-group frequencies.

:class:`WholeModel` is the engine's step hook (:class:`treeopt.engine.StepHook`): it runs
between the step's checks and its commit. Gradients are rescaled or accumulated there, and
its own state (the last norm, the count of skipped steps, the accumulation buffers) is
written only when the step commits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from treeopt.backends import backend_of
from treeopt.clip import clip_factor, global_norm, scale
from treeopt.engine import Group, Pair, Prepared
from treeopt.errors import ParameterError, TreeoptError, describe
from treeopt.ops import all_finite, cast
from treeopt.types import Array


class WholeModel:
    """The whole-model options of a ``MultiOptimizer`` and their state.

    Args:
        max_grad_norm: clip the global norm of all gradients to it (``None``: no clipping).
        skip_nonfinite: skip the step of every group when a gradient is not finite.
        accumulate: average gradients over this many calls before a step; one per child, or
            one for all.
        children: the groups of each child of the ``MultiOptimizer``, in order.
    """

    def __init__(
        self,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        accumulate: int | Sequence[int] = 1,
        children: Sequence[Sequence[Group]] = ((),),
    ) -> None:
        if max_grad_norm is not None and not max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm should be >=0, {max_grad_norm} was provided instead")
        count = len(children)
        counts = [accumulate] * count if isinstance(accumulate, int) else list(accumulate)
        if len(counts) != count or not all(isinstance(n, int) and n >= 1 for n in counts):
            raise ValueError(f"accumulate must be an integer >= 1 or one per optimizer ({count}), got {accumulate!r}")
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = bool(skip_nonfinite)
        self.accumulate = tuple(counts)  # update frequency of each child (all 1: no accumulation)
        self.children = [list(groups) for groups in children]
        self._child = {id(group): i for i, groups in enumerate(self.children) for group in groups}
        #: the MultiOptimizer's state dict: ``states`` and the whole-model entries
        self.state: dict[str, Any] = {}
        #: ``None``, or a function giving the global gradient norm of the step when this
        #: optimizer sees only some of the gradients (set by treeopt.distributed)
        self.shared_norm: Callable[[], Array] | None = None

    @property
    def accumulating(self) -> bool:
        return any(n > 1 for n in self.accumulate)

    @property
    def active(self) -> bool:
        return self.max_grad_norm is not None or self.skip_nonfinite or self.accumulating

    def entries(self) -> dict[str, Any]:
        """The state kept for the whole model: the last norm, skipped steps, accumulation."""
        return {k: v for k, v in self.state.items() if k != "states"}

    def prepare(self, pairs: list[Pair]) -> Prepared:
        """The pairs to update this call, the groups that step, and a commit."""
        if not self.active:
            return Prepared(pairs)
        state, updates = self.state, {}  # entries of the state, written at commit
        shared = self.shared_norm
        if (self.max_grad_norm is not None or self.skip_nonfinite) and (pairs or shared is not None):
            # under ZeRO-1 a rank updates only its own parameters, but the norm and the skip
            # decision are the whole model's: treeopt.distributed hands them in
            norm = global_norm([pair.grad for pair in pairs]) if shared is None else shared()
            updates["grad_norm"] = norm
            if self.skip_nonfinite and not _concrete(all_finite(norm), "skip_nonfinite"):
                updates["skipped_steps"] = state.get("skipped_steps", 0) + 1
                return Prepared([], [], lambda: state.update(updates))
            if self.max_grad_norm is not None:
                factor = clip_factor(norm, self.max_grad_norm)
                for pair in pairs:
                    pair.grad = scale(pair.grad, factor)
        stepping = None
        if self.accumulating:
            micro = state.get("micro_step", 0)
            due = [(micro + 1) % n == 0 for n in self.accumulate]
            buffers = dict(state.get("accumulated", {}))
            kept = []
            for pair in pairs:
                child = self._child[id(pair.group)]
                count = self.accumulate[child]
                if count == 1:
                    kept.append(pair)
                    continue
                if pair.path in buffers:
                    _check_buffer(buffers[pair.path], pair)
                total = pair.grad if pair.path not in buffers else buffers[pair.path] + pair.grad
                if due[child]:
                    pair.grad = total * cast(1 / count, total)
                    buffers.pop(pair.path, None)
                    kept.append(pair)
                else:
                    buffers[pair.path] = total
            pairs = kept
            stepping = [group for i, groups in enumerate(self.children) if due[i] for group in groups]
            updates["micro_step"] = micro + 1
            updates["accumulated"] = buffers
        return Prepared(pairs, stepping, lambda: state.update(updates))


def _concrete(flag, option):
    try:
        return bool(flag)
    except Exception as error:  # a tracer inside jax.jit or mx.compile
        raise TreeoptError(
            f"MultiOptimizer({option}=...) decides in Python whether to step, so it cannot "
            "run inside jax.jit or mx.compile; use optax.apply_if_finite / optax.MultiSteps "
            "there"
        ) from error


def _check_buffer(buffer: Array, pair: Pair) -> None:
    """An accumulation buffer (perhaps loaded from a checkpoint) must be of its gradient's
    library, shape and dtype: never broadcast."""
    backend = backend_of(buffer)
    found = (
        getattr(backend, "name", type(buffer).__name__),
        tuple(backend.shape(buffer)) if backend else None,
        backend.dtype_name(buffer) if backend else None,
    )
    expected = (pair.backend.name, tuple(pair.backend.shape(pair.grad)), pair.backend.dtype_name(pair.grad))
    if found != expected:
        raise ParameterError(
            f"MultiOptimizer: the accumulated gradient of {describe(pair.path)} is a {found[0]} "
            f"{found[2]} array of shape {found[1]}, but the gradient is a {expected[0]} {expected[2]} "
            f"array of shape {expected[1]}",
            pair.path,
        )
