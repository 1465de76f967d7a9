"""What a rule is.

A rule is an optimizer's math in two plain functions:

- ``coefficients(lr, step, **hyper) -> dict``: the scalars of one step (bias corrections,
  ``1 - beta``...), computed once per step and dtype from the learning rate (already in
  the gradient's dtype), the step count after the increment, and the hyper-parameters.
- ``update(grad, param, *slots, **coefficients) -> (param, *slots)``: one step for one
  tensor. It uses arithmetic and the functions of :mod:`treeopt.ops` only, and receives
  every coefficient already cast to the tensor's dtype.

An *elementwise* update also works on single elements; the fast runners inline it into one
loop over many tensors. A *stackable* update also takes ``stacked=True``: then every array
holds same-shape tensors stacked along a new first axis, and the result is the stack of the
per-tensor results (runners use it to batch matrix products). Runners decide how a rule
runs, never what it computes.
"""

from dataclasses import dataclass, field
from typing import Callable, Tuple, Union

Numeric = (int, float)


@dataclass(frozen=True)
class Rule:
    name: str
    update: Callable
    coefficients: Callable
    #: slot names in the order ``update`` takes and returns them, or a function of
    #: ``(ndim, hyper)`` for rules whose slots depend on the parameter
    slots: Union[Tuple[str, ...], Callable]
    elementwise: bool = True
    #: ``update(..., stacked=True)`` runs on same-shape tensors stacked along a first axis
    stackable: bool = False
    #: what each slot holds, so state can move between optimizers whose slots mean the same
    slot_meanings: dict = field(default=None, compare=False, hash=False)

    def slot_names(self, ndim: int, hyper) -> Tuple[str, ...]:
        return self.slots(ndim, hyper) if callable(self.slots) else self.slots


def active(value, when=lambda v: v != 0) -> bool:
    """Whether a hyper-parameter switches its term on. A scheduled value (an array) may
    change from step to step, so its term is always computed."""
    return when(value) if isinstance(value, Numeric) else True
