"""treeopt's checkpoint content (name-keyed tensors and metadata) in torch's optimizer
layout, and back.

torch's layout keys the state by a parameter's position in ``param_groups``;
``torch.distributed.checkpoint`` re-keys it by name (``get_optimizer_state_dict``) and hands
``load_state_dict`` the state keyed by name with the groups' other entries
(``set_optimizer_state_dict``). So everything treeopt needs travels inside that layout: slots
in ``state``, each group's ``param_names``, its scalars (``step``, ``learning_rate``...) under
``treeopt_tensors``, and the metadata, as JSON, in the first group (with the whole-model
tensors).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from treeopt.checkpoint.base import slot_key
from treeopt.torch.names import canonical_name

if TYPE_CHECKING:
    import torch

__all__ = ["to_torch", "from_torch"]


def to_torch(
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, Any],
    param_groups: Sequence[Mapping[str, Any]],
) -> tuple[dict[int, dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """``(state, param_groups)`` over the same tensors as ``tensors``. ``param_groups``: one
    mapping per treeopt group, in order, with its ``name``, ``param_names`` and the values
    to keep beside them (``lr``, ``betas``...)."""
    state, groups, position = {}, [], 0
    slots_of = {path: info["slots"] for path, info in metadata["parameters"].items()}
    for i, group in enumerate(param_groups):
        name, names = group["name"], list(group["param_names"])
        entry = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        entry["params"] = list(range(position, position + len(names)))
        entry["param_names"] = names
        for index, path in zip(entry["params"], names):
            if slots_of.get(path):
                state[index] = {slot: tensors[slot_key(path, slot)] for slot in slots_of[path]}
        own = [k for k in tensors if k.startswith(f"@{name}/") or (i == 0 and k.startswith("#"))]
        entry["treeopt_tensors"] = {k: tensors[k] for k in own}
        if i == 0:
            entry["treeopt_metadata"] = json.dumps(metadata)
        groups.append(entry)
        position += len(names)
    return state, groups


def from_torch(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` from torch's layout: state keyed by position (with
    ``param_names``) or by name (as ``set_optimizer_state_dict`` passes it)."""
    groups = state_dict["param_groups"]
    found = [g["treeopt_metadata"] for g in groups if "treeopt_metadata" in g]
    if not found:
        raise ValueError(
            "this optimizer state dict carries no treeopt_metadata in its param_groups: it was not "
            "written by treeopt.torch.Optimizer, or torch.distributed.checkpoint flattened it "
            "(StateDictOptions(flatten_optimizer_state_dict=True) keeps only the keys that the live "
            "param_groups have; use the default); treeopt loads by parameter name and needs it"
        )
    metadata, tensors, state = json.loads(found[0]), {}, state_dict["state"]
    for group in groups:
        keys, names = group["params"], group.get("param_names")
        for i, key in enumerate(keys):
            if isinstance(key, str):
                path = canonical_name(key)
            elif names is not None and len(names) == len(keys):
                path = names[i]
            else:
                raise ValueError(f"optimizer state entry {key!r} has no parameter name (param_names missing)")
            for slot, tensor in state.get(key, {}).items():
                tensors[slot_key(path, slot)] = tensor
        tensors.update(group.get("treeopt_tensors", {}))
    return tensors, metadata
