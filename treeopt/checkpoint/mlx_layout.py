"""The layout MLX users already have: ``tree_flatten(optimizer.state)`` saved with
``mx.save_safetensors`` or ``np.savez``. Keys are dotted: ``step``, ``learning_rate``,
``layers.0.weight.m``, and for a MultiOptimizer ``states.0.step``, ``states.1.layers.0.bias.v``.
They are mapped to parameter paths and optimizers through the routing of the optimizer
being loaded."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from treeopt._trees import dotted
from treeopt.checkpoint.base import slot_key
from treeopt.checkpoint.format import FORMAT, FORMAT_VERSION, leaf_optimizers
from treeopt.tree import tree_flatten
from treeopt.types import Array

if TYPE_CHECKING:
    from treeopt.checkpoint.base import Stored
    from treeopt.optimizer import Optimizer


def is_mlx_layout(keys: Iterable[str]) -> bool:
    return "step" in keys or any(k.startswith("states.") for k in keys)


def to_mlx(optimizer: Optimizer) -> dict[str, Array]:
    """The arrays of ``tree_flatten(optimizer.state)``, as MLX would save them."""
    return dict(tree_flatten(optimizer.state))


def from_mlx(optimizer: Optimizer, arrays: Stored) -> tuple[dict[str, Array], dict[str, Any]]:
    """``(tensors, metadata)`` in treeopt's form for MLX-layout ``arrays``, with the
    optimizers of ``optimizer`` (matched by position, as MLX's layout has nothing else)."""
    leaves = leaf_optimizers(optimizer)
    prefixes = [(("".join(f"states.{i}." for i in position)), name, leaf, position) for name, position, leaf in leaves]
    tensors, parameters, optimizers = {}, {}, []
    for prefix, name, leaf, position in prefixes:
        scalars = set(leaf.scalar_names()) | {"step", "learning_rate"}
        slots_of: dict[str, dict[str, Array]] = {}
        for key, value in arrays.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if rest in scalars:
                tensors[f"@{name}/{rest}"] = value
                continue
            path, _, slot = rest.rpartition(".")
            if path.startswith("~") and path[1:].split(".")[0] in scalars:
                path = path[1:]
            slots_of.setdefault(path, {})[slot] = value
        for path, slots in slots_of.items():
            parameters[path] = {
                "owner": name,
                "slots": {s: {"shape": list(v.shape), "dtype": v.dtype.name} for s, v in slots.items()},
            }
            tensors.update({slot_key(path, s): v for s, v in slots.items()})
        optimizers.append(
            {
                "name": name,
                "position": list(position),
                "type": type(leaf).__name__,
                "hyperparameters": {},
                "scheduled": sorted(leaf.schedules),
            }
        )
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "optimizers": optimizers, "parameters": parameters}
    return tensors, metadata


__all__ = ["is_mlx_layout", "to_mlx", "from_mlx", "dotted"]
