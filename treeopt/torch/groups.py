"""``param_groups`` of a ``treeopt.torch.Optimizer``: torch's list of group dicts over
treeopt's groups, and the checks an edited value passes before treeopt takes it.

A group is a treeopt optimizer (one of a ``MultiOptimizer``'s), so the list has one dict per
optimizer, in order, and is not grown, shrunk or reordered by hand (:class:`ParamGroups`);
parameters join a group through ``add_param_group``. A value edited in a dict (by hand, by
an LR scheduler, or in a state dict before it is loaded) is checked by :func:`edit` as the
optimizer's own constructor checks it, before any value is applied.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from operator import is_
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, SupportsIndex

import numpy as np
import torch

from treeopt.backends import as_float

if TYPE_CHECKING:
    from treeopt.optimizer import Optimizer

__all__ = ["ParamGroups", "Edit", "edit", "plain", "shortest", "TORCH_NAMES"]

#: treeopt hyper-parameter -> param_groups key
TORCH_NAMES = {"learning_rate": "lr"}

REFUSED = (
    "the param_groups of a treeopt.torch.Optimizer hold one group per treeopt optimizer, in the "
    "MultiOptimizer's order: a group cannot be added, removed, replaced or moved by hand. Add "
    "parameters with add_param_group({{'params': [...], 'name': <group>}}) (or without 'name': "
    "routed by the filters), or give the MultiOptimizer another optimizer; {what} was refused"
)


class ParamGroups(list):
    """``param_groups``: a list of the group dicts whose length and order are treeopt's.

    Reading, iterating and editing the dicts work as in ``torch.optim``; ``append``,
    ``del``, ``insert``, ``pop``, ``remove``, ``clear``, ``sort``, ``reverse``, ``+=`` and
    assigning another dict raise ``TypeError`` (which says to use ``add_param_group``)."""

    __slots__ = ()

    def _refuse(self, what: str) -> NoReturn:
        raise TypeError(REFUSED.format(what=what))

    def append(self, group: Any) -> NoReturn:
        self._refuse("append")

    def extend(self, groups: Iterable[Any]) -> NoReturn:
        self._refuse("extend")

    def insert(self, index: SupportsIndex, group: Any) -> NoReturn:
        self._refuse("insert")

    def pop(self, index: SupportsIndex = -1) -> NoReturn:
        self._refuse("pop")

    def remove(self, group: Any) -> NoReturn:
        self._refuse("remove")

    def clear(self) -> NoReturn:
        self._refuse("clear")

    def sort(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse("sort")

    def reverse(self) -> NoReturn:
        self._refuse("reverse")

    def __delitem__(self, index: Any) -> NoReturn:
        self._refuse("del")

    def __iadd__(self, groups: Iterable[Any]) -> NoReturn:  # type: ignore[misc]
        self._refuse("+=")

    def __imul__(self, count: SupportsIndex) -> NoReturn:
        self._refuse("*=")

    def __setitem__(self, index: Any, value: Any) -> None:
        current = list.__getitem__(self, index)
        same = (
            len(value) == len(current) and all(map(is_, value, current))
            if isinstance(index, slice)
            else value is current
        )
        if not same:  # setting the same dicts back (what wrappers do) is harmless
            self._refuse("assigning another group")
        list.__setitem__(self, index, value)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:  # pickle and deepcopy, without append
        return ParamGroups, (list(self),)


def same_groups(new: list[dict[str, Any]], current: list[dict[str, Any]], names: list[str]) -> None:
    """Raise unless ``new`` (what is assigned to ``param_groups``) is the same groups, in
    the same order: the same dicts, or dicts with the same names."""
    fits = len(new) == len(current) and all(
        isinstance(group, dict) and (group is old or group.get("name") == name)
        for group, old, name in zip(new, current, names)
    )
    if not fits:
        raise ValueError(REFUSED.format(what=f"param_groups = a list of {len(new)} groups"))


def plain(value: Any) -> Any:
    """A group value comparable with ``==``: tensors as Python numbers, lists as tuples."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else tuple(value.tolist())
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    return value


def shortest(value: Any) -> float:
    """A float32 value as the shortest decimal that rounds back to it (0.02, not
    0.019999999552965164), so that what param_groups shows reads as what was given."""
    return float(str(np.float32(value)))


class Edit(NamedTuple):
    """A checked change of one hyper-parameter: ``apply()`` makes it, ``undo()`` puts back
    what was there when the edit was made."""

    apply: Callable[[], None]
    undo: Callable[[], None]


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def edit(leaf: Optimizer, key: str, value: Any, where: str) -> Edit:
    """The edit that gives ``leaf`` the ``value`` of its group's ``key`` (a param_groups
    key: ``lr``, or a hyper-parameter's name), checked now: of the kind the current value
    is, and accepted by ``leaf``'s constructor. Raises ``ValueError`` naming ``where``."""
    value = plain(value)
    if key == "lr":
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where} must be a finite number >= 0, got {value!r}")
        old_lr = leaf.state.get("learning_rate")
        return Edit(
            lambda: setattr(leaf, "learning_rate", float(value)),
            lambda: leaf.state.__setitem__("learning_rate", old_lr),
        )
    if key not in leaf.hyperparameters:
        raise ValueError(f"{where}: {type(leaf).__name__} has no hyper-parameter {key!r}")
    current = getattr(leaf, key, None)
    value = _of_kind(value, current, where)
    _construct(leaf, key, value, where)

    def put(new: Any) -> Callable[[], None]:
        def apply() -> None:
            setattr(leaf, key, new)
            leaf.book.version += 1  # a compiled step re-plans with the new value

        return apply

    return Edit(put(value), put(current))


def _of_kind(value: Any, current: Any, where: str) -> Any:
    """``value`` as the kind of ``current``: a flag, an integer, a number, a tuple of
    numbers, or an option (a string or ``None``)."""
    if isinstance(current, bool):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{where} must be True or False, got {value!r}")
        return bool(value)
    if isinstance(current, numbers.Integral):
        if isinstance(value, bool) or not (
            isinstance(value, numbers.Integral) or isinstance(value, float) and value.is_integer()
        ):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if isinstance(current, float) or callable(current):
        if not _is_number(value):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(current, tuple):
        if not isinstance(value, tuple) or len(value) != len(current) or not all(map(_is_number, value)):
            raise ValueError(f"{where} must be {len(current)} numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if current is None or isinstance(current, str):
        if not (value is None or isinstance(value, str)):
            raise ValueError(f"{where} must be a string or None, got {value!r}")
        return value
    raise ValueError(f"{where} cannot be set to {value!r} (it is {current!r})")


def _construct(leaf: Optimizer, key: str, value: Any, where: str) -> None:
    """Build a throwaway optimizer of ``leaf``'s class with ``leaf``'s settings and the new
    value, so that the constructor's own checks (ranges, combinations) judge it. A class
    that cannot be rebuilt from its attributes is judged by :func:`_of_kind` alone."""
    cls = type(leaf)
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    settings = leaf.rule_hyperparameters()
    kwargs: dict[str, Any] = {}
    for name, parameter in parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name == "learning_rate" and "learning_rate" in leaf.state:
            kwargs[name] = as_float(leaf.state["learning_rate"])
        elif hasattr(leaf, name):
            kwargs[name] = _settled(getattr(leaf, name), settings.get(name))
        elif parameter.default is parameter.empty:
            return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cls(**kwargs)
        except Exception:  # not rebuilt faithfully from its attributes: no verdict from it
            return
        try:
            cls(**dict(kwargs, **{key: value}))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None


def _settled(value: Any, current: Any) -> Any:
    """An attribute as a constructor takes it, a schedule replaced by its current value."""
    if callable(value):
        return as_float(current)
    if isinstance(value, tuple) and any(map(callable, value)):
        return tuple(as_float(c) if callable(v) else v for v, c in zip(value, current))
    return value
