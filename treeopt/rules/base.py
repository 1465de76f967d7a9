"""What a rule is, written once and checked when a rule is defined.

A rule is an optimizer's math in plain functions:

- ``coefficients(lr, step, *, <hyper-parameters>, <running values>) -> dict``: the scalars
  of one step (bias corrections, ``1 - beta``...), computed once per step and dtype from the
  learning rate (already in the gradient's dtype), the step count after the increment, the
  hyper-parameters and the rule's running values. Its keyword-only parameters *are* the
  optimizer's hyper-parameters: nothing restates them.
- ``update(grad, param, <slots>, <coefficients>) -> (param, *slots)``: one step for one
  tensor. The slots come in the order of ``slots`` (or as ``*slots`` when they depend on the
  parameter), then exactly the names ``coefficients`` returns. It uses arithmetic and the
  functions of :mod:`treeopt.ops` only, and receives every coefficient already cast to the
  tensor's dtype (so it holds no literal).
- ``advance(lr, step, *, <running values>, <hyper-parameters>) -> dict`` (only for a rule
  with ``running`` values): the optimizer-level numbers a step carries forward, such as
  schedule-free's sum of weights. It runs once per step, after the step count and the
  schedules advance and before any coefficient is computed; the values live in the
  optimizer's state beside ``step`` (float32 scalars of the state's library), so plans,
  checkpoints and every backend handle them as they handle the learning rate.

A rule that is not elementwise may say how it splits (``parts``, a :class:`Parts`): an
elementwise part on the gradient, parameter and slots that gives a *direction*, a part that
needs the whole tensor (Muon's Newton-Schulz) on that direction only, and an elementwise part
that applies it to the parameter. ``update`` must equal the three in a row. A runner whose
tensors are split across ranks (FSDP2) runs the elementwise parts on each rank's rows and
moves only the direction to one rank and back.

An *elementwise* update also works on single elements; the fast runners inline it into one
loop over many tensors, so it may call only the :data:`treeopt.ops.ELEMENTWISE` functions.
A *stackable* update also takes ``stacked=True``: then every array holds same-shape tensors
stacked along a new first axis, and the result is the stack of the per-tensor results
(runners use it to batch matrix products). Runners decide how a rule runs, never what it
computes.

:class:`Rule` checks all of this when it is created, and the coefficient names the first
time they are computed (before anything is written); a broken rule raises
:class:`RuleError` naming the rule and what is wrong.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from treeopt import ops
from treeopt.types import Array, Scalar, Shape

Numeric = (int, float)

__all__ = ["Parts", "Rule", "RuleError", "active", "check_coefficients", "keyword_only", "rule_checked"]


class RuleError(TypeError):
    """A rule that does not follow the contract of :mod:`treeopt.rules.base`."""


@dataclass(frozen=True)
class Parts:
    """How a rule that needs whole tensors splits, each part taking the coefficients by name
    (and ignoring the others: ``**_``):

    - ``direction(grad, param, *slots, **coefficients) -> (direction, *slots)``: elementwise,
      so it runs on any rows of a tensor; ``slots``: the tensor's slots but ``whole_slots``;
    - ``whole(direction, *slots, stack=0, **coefficients) -> (direction, *slots)``: on whole
      tensors (each tensor of a stack when the first ``stack`` axes index one); ``slots``:
      those of ``whole_slots`` the tensor has (NorMuon's one value per output row), which
      travel with the direction and so must be split by rows as the parameter is;
    - ``apply(param, direction, shape, **coefficients) -> param``: elementwise; ``shape`` is
      one whole tensor's shape, for what depends on it (Muon's learning-rate scale).
    """

    direction: Callable[..., tuple[Array, ...]]
    whole: Callable[..., tuple[Array, ...]]
    apply: Callable[..., Array]
    whole_slots: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    name: str
    #: ``update(grad, param, *slots, **coefficients) -> (param, *slots)``
    update: Callable[..., tuple[Array, ...]]
    #: ``coefficients(lr, step, **hyper-parameters) -> {name: value}``
    coefficients: Callable[..., dict[str, Scalar]]
    #: slot names in the order ``update`` takes and returns them, or a function of
    #: ``(shape, hyper)`` giving ``{slot name: shape}`` for rules whose slots depend on the
    #: parameter
    slots: tuple[str, ...] | Callable[[Shape, dict[str, Any]], dict[str, Shape]]
    elementwise: bool = True
    #: ``update(..., stacked=True)`` runs on same-shape tensors stacked along a first axis
    stackable: bool = False
    #: what each slot holds, so state can move between optimizers whose slots mean the same
    slot_meanings: dict[str, str] | None = field(default=None, compare=False, hash=False)
    #: slots that start as a copy of the parameter (the others start at zero)
    copies_param: tuple[str, ...] = ()
    #: optimizer-level running values (start at zero) and the function that advances them
    running: tuple[str, ...] = ()
    advance: Callable[..., dict[str, Scalar]] | None = field(default=None, compare=False, hash=False)
    #: how an update that needs whole tensors splits around the part that does (see :class:`Parts`)
    parts: Parts | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check(self)

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """The optimizer's hyper-parameters: ``coefficients``' keyword-only parameters that
        are not running values, in their order."""
        return tuple(n for n in keyword_only(self.coefficients) if n not in self.running)

    def slot_shapes(self, shape: Sequence[int], hyper: dict[str, Any] | None) -> dict[str, Shape]:
        """``{slot name: shape}`` for a parameter of ``shape``."""
        if callable(self.slots):
            assert hyper is not None  # given whenever the slots depend on it
            return self.slots(tuple(shape), hyper)
        return {n: tuple(shape) for n in self.slots}

    def slot_names(self, shape: Sequence[int], hyper: dict[str, Any] | None) -> tuple[str, ...]:
        """The slots ``update`` takes, in order, for a parameter of ``shape``."""
        return tuple(self.slot_shapes(shape, hyper)) if callable(self.slots) else self.slots

    def coefficient_names(self) -> tuple[str, ...]:
        """The coefficients ``update`` takes, after its slots, in its order."""
        parameters = list(inspect.signature(self.update).parameters.values())[2:]
        if not callable(self.slots):
            parameters = parameters[len(self.slots) :]
        runner_only = ("stacked",) if self.stackable else ()  # how a runner calls it, not a coefficient
        return tuple(p.name for p in parameters if p.kind is not p.VAR_POSITIONAL and p.name not in runner_only)


_CHECKED: set[Rule] = set()  # rules whose coefficient names were found to be update's


def check_coefficients(rule: Rule, values: dict[str, Any]) -> None:
    """The names ``rule.coefficients`` returned must be the ones ``rule.update`` takes
    (checked once per rule, the first time its coefficients are computed)."""
    if rule in _CHECKED:
        return
    expected = rule.coefficient_names()
    if sorted(values) != sorted(expected):
        missing, extra = sorted(set(expected) - set(values)), sorted(set(values) - set(expected))
        raise RuleError(
            f"rule {rule.name!r}: update takes the coefficients {list(expected)}, but coefficients "
            f"returned {sorted(values)} (missing {missing}, unexpected {extra})"
        )
    _CHECKED.add(rule)


def rule_checked(rule: Rule) -> bool:
    """Whether ``rule``'s coefficient names were already checked."""
    return rule in _CHECKED


def keyword_only(function: Callable[..., Any]) -> list[str]:
    """The names of ``function``'s keyword-only parameters."""
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]


def _check(rule: Rule) -> None:
    label = f"rule {rule.name!r}"
    update = list(inspect.signature(rule.update).parameters.values())
    if [p.name for p in update[:2]] != ["grad", "param"]:
        raise RuleError(f"{label}: update must start with (grad, param, ...), got {[p.name for p in update[:2]]}")
    if callable(rule.slots):
        if len(update) < 3 or update[2].kind is not update[2].VAR_POSITIONAL:
            raise RuleError(f"{label}: slots depend on the parameter, so update takes them as *slots")
    else:
        names = [p.name for p in update[2 : 2 + len(rule.slots)]]
        if names != list(rule.slots):
            raise RuleError(f"{label}: update takes the slots {names} but the rule declares {list(rule.slots)}")
    if rule.stackable and "stacked" not in [p.name for p in update]:
        raise RuleError(f"{label}: a stackable update takes stacked=False (True: a stack of same-shape tensors)")
    if any(p.kind is p.VAR_KEYWORD for p in update):
        raise RuleError(f"{label}: update must name every coefficient it takes (no **kwargs)")
    coefficients = list(inspect.signature(rule.coefficients).parameters.values())
    if [p.name for p in coefficients[:2]] != ["lr", "step"] or any(
        p.kind is not p.KEYWORD_ONLY for p in coefficients[2:]
    ):
        raise RuleError(f"{label}: coefficients must be (lr, step, *, <hyper-parameters>)")
    missing = [n for n in rule.running if n not in keyword_only(rule.coefficients)]
    if missing:
        raise RuleError(f"{label}: coefficients must take its running values {missing} by name")
    if rule.running and rule.advance is None:
        raise RuleError(f"{label}: a rule with running values {list(rule.running)} needs an advance function")
    if rule.advance is not None:
        wanted = set(rule.running) | set(rule.hyperparameters)
        taken = set(keyword_only(rule.advance))
        if not taken <= wanted:
            raise RuleError(
                f"{label}: advance takes {sorted(taken - wanted)}, which are neither running "
                "values nor hyper-parameters"
            )
    unknown = [n for n in rule.copies_param if not callable(rule.slots) and n not in rule.slots]
    if unknown:
        raise RuleError(f"{label}: copies_param names {unknown}, which are not slots")
    if rule.parts is not None and rule.elementwise:
        raise RuleError(f"{label}: parts split an update that needs whole tensors; this rule is elementwise")
    if rule.elementwise:
        outside = sorted(_ops_called(rule.update) - set(ops.ELEMENTWISE))
        if outside:
            raise RuleError(
                f"{label}: an elementwise update may call only {list(ops.ELEMENTWISE)} of treeopt.ops "
                f"(the compiled loop has a scalar form of these); it calls {outside}: declare the rule "
                "elementwise=False"
            )


def _ops_called(function, seen=None):
    """Names of the :mod:`treeopt.ops` functions ``function`` calls, through the rule
    functions it calls."""
    seen = set() if seen is None else seen
    if function in seen:
        return set()
    seen.add(function)
    found = set()
    for name in function.__code__.co_names:
        value = function.__globals__.get(name)
        if value is not None and getattr(ops, name, None) is value:
            found.add(name)
        elif isinstance(value, types.FunctionType) and value.__module__.startswith("treeopt.rules"):
            found |= _ops_called(value, seen)
    return found


def active(value: Scalar, when: Callable[[Any], bool] = lambda v: v != 0) -> bool:
    """Whether a hyper-parameter switches its term on. A scheduled value (an array) may
    change from step to step, so its term is always computed."""
    return when(value) if isinstance(value, Numeric) else True
