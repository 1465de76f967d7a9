"""The layout MLX users already have: ``tree_flatten(optimizer.state)`` saved with
``mx.save_safetensors`` or ``np.savez``. Keys are dotted: ``step``, ``learning_rate``,
``layers.0.weight.m``, and for a MultiOptimizer ``states.0.step``, ``states.1.layers.0.bias.v``.
They are mapped to parameter paths and optimizers through the routing of the optimizer
being loaded."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from treeopt._trees import dotted
from treeopt.backends import array_backend
from treeopt.checkpoint.base import slot_key
from treeopt.checkpoint.format import FORMAT, FORMAT_VERSION
from treeopt.tree import tree_flatten
from treeopt.types import Array

if TYPE_CHECKING:
    from treeopt.checkpoint.base import Stored
    from treeopt.optimizer import Optimizer


def is_mlx_layout(keys: Iterable[str]) -> bool:
    return "step" in keys or any(k.startswith("states.") for k in keys)


def to_mlx(optimizer: Optimizer) -> dict[str, Array]:
    """The arrays of ``tree_flatten(optimizer.state)``, as MLX would save them. Slots stored
    compactly (``state_dtype``) are read back into the parameter's dtype, as MLX keeps them."""
    flat = dict(tree_flatten(optimizer.state))
    for _, position, group in optimizer.groups():
        store = group.store
        if store.precision is None:
            continue
        prefix = "".join(f"states.{i}." for i in position)
        for keys, slots in store.items():
            shape, dtype = store.parameters[keys]
            layout = store.layout(shape, dtype, keys)
            if layout is None:
                continue
            path = prefix + ".".join(map(str, (store.key(keys[0]),) + tuple(keys[1:])))
            for key in slots:
                flat.pop(f"{path}.{key}", None)
            for slot, value in zip(layout.forms, store.load(slots, layout.forms, layout)):
                flat[f"{path}.{slot}"] = array_backend(value).astype(value, dtype)
    return flat


def from_mlx(optimizer: Optimizer, arrays: Stored) -> tuple[dict[str, Array], dict[str, Any]]:
    """``(tensors, metadata)`` in treeopt's form for MLX-layout ``arrays``, with the
    optimizers of ``optimizer`` (matched by position, as MLX's layout has nothing else)."""
    groups = optimizer.groups()
    prefixes = [
        (("".join(f"states.{i}." for i in position)), name, group, position) for name, position, group in groups
    ]
    tensors, parameters, optimizers = {}, {}, []
    for prefix, name, group, position in prefixes:
        scalars = set(group.scalars.names()) | {"step", "learning_rate"}
        slots_of: dict[str, dict[str, Array]] = {}
        for key in arrays.keys():
            if not key.startswith(prefix):
                continue
            value = arrays[key]
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
                "type": type(group).__name__,
                "hyperparameters": {},
                "scheduled": sorted(group.scalars.schedules),
            }
        )
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "optimizers": optimizers, "parameters": parameters}
    return tensors, metadata


__all__ = ["is_mlx_layout", "to_mlx", "from_mlx", "dotted"]
