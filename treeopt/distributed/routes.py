"""The routes every rank plans with: decided and kept before any slot exists."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from treeopt import engine

if TYPE_CHECKING:
    from treeopt.optimizer import Optimizer

__all__ = ["assign", "targets"]


def targets(optimizer: Optimizer, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: target}`` (the group that updates it and its rule's options for it; ``None``:
    frozen) for ``parameters``, decided and kept now, creating no state."""
    decided = engine.route(optimizer.router, dict(parameters), type(optimizer).__name__)
    return {pair.path: target for pair, target in decided}


def assign(optimizer: Optimizer, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: group that updates it}`` (``None``: frozen) for ``parameters``, decided and
    kept now, creating no state."""
    return {name: None if target is None else target.group for name, target in targets(optimizer, parameters).items()}
