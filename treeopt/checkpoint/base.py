"""What every checkpoint module shares: the format's name and version, the error and problem
records a load reports, and how a stored array becomes a state scalar or takes the place of a
state array. :mod:`.format` (saving and loading), :mod:`.routing` and :mod:`.validate` build on
it; it imports none of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from treeopt.backends import array_backend
from treeopt.errors import TreeoptError
from treeopt.types import Array, Scalar

if TYPE_CHECKING:
    from collections.abc import Mapping

    from treeopt.checkpoint.files import Tensors

    #: checkpoint tensors by key: a dict, or the lazily read tensors of an open file
    Stored: TypeAlias = Mapping[str, Array] | Tensors
    from treeopt.checkpoint.format import LoadReport

FORMAT = "treeopt-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(TreeoptError, ValueError):
    """A checkpoint that cannot be read, or does not fit the optimizer (see ``report``)."""

    def __init__(self, message: str, report: LoadReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Problem:
    kind: str  # missing, unexpected, shape, dtype, slots, owner, hyperparameter, optimizer
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind:<14} {self.path}: {self.message}"


def slot_key(path: str, slot: str) -> str:
    """The key of ``path``'s slot ``slot``: ``"{path}/{slot}"``. A path that starts as the
    format's own keys do (``@``, ``#``, or ``~`` before either) gets one more ``~`` in front,
    so no parameter name is read as an optimizer's scalar or whole-model state."""
    return f"~{path}/{slot}" if path.lstrip("~").startswith(("@", "#")) else f"{path}/{slot}"


def split_slot_key(key: str) -> tuple[str, str]:
    """``(path, slot)`` of a :func:`slot_key`."""
    path, _, slot = key.rpartition("/")
    if path.startswith("~") and path.lstrip("~").startswith(("@", "#")):
        path = path[1:]
    return path, slot


def numpy_scalar(value: Scalar) -> np.ndarray:
    backend = array_backend(value)
    return np.asarray(backend.to_numpy(value) if backend.name != "python" else value)


def assign(slots: dict[str, Array], slot: str, array: Array) -> None:
    """Put ``array`` into ``slots[slot]``, on the library, device and dtype of what is there."""
    current = slots[slot]
    target, source = array_backend(current), array_backend(array)
    value = array if source is target else target.from_numpy(source.to_numpy(array), like=current)
    if target.mutable and target.writable(current):
        target.write(current, value)
    else:
        slots[slot] = value
