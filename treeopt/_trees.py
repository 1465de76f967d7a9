"""Internal tree helpers for the optimizer core: keys, lookups, state mirrors, assignment.

A leaf is located by its *keys*, the tuple of dict keys and list indices on the way to it;
unlike a dotted path, keys are exact even for keys that contain dots or are digit strings.
"""

from collections.abc import Iterable
from typing import Any

from treeopt.tree import is_container, rebuild


def dotted(keys: Iterable[object]) -> str:
    return ".".join(map(str, keys))


#: name segments that only wrappers insert (torch.compile, FSDP, activation checkpointing)
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
#: DDP and DataParallel hold the model as ``.module``: leading ``module`` segments are theirs
_DATA_PARALLEL = "module"


def canonical_name(name: str) -> str:
    """``name`` without the segments wrappers insert: ``"module._orig_mod.blocks.0.weight"``
    -> ``"blocks.0.weight"``. Wrapper segments go wherever they are; ``module`` segments only
    at the start (where DDP puts them), so a bare model whose root has a child named
    ``module`` gets the same names as under DDP."""
    segments = [s for s in name.split(".") if s not in WRAPPER_SEGMENTS]
    while len(segments) > 1 and segments[0] == _DATA_PARALLEL:
        segments.pop(0)
    return ".".join(segments)


def lookup(node, key):
    """``node[key]``, or ``None`` when absent. After a flatten/unflatten round trip a dict
    may hold ``"0"`` for ``0``, or a list where a dict of digit keys was: both are found."""
    if isinstance(node, dict):
        value = node.get(key)
        if value is None and not isinstance(key, str):
            value = node.get(str(key))
        return value
    if isinstance(node, (list, tuple)):
        if isinstance(key, str):
            if not key.isdigit():
                return None
            key = int(key)
        return node[key] if 0 <= key < len(node) else None
    return None


def lookup_path(node, keys):
    for key in keys:
        node = lookup(node, key)
        if node is None:
            return None
    return node


def as_dict(node):
    """A state node that must mirror a dict; a round trip may have turned it into a list."""
    if isinstance(node, dict):
        return node
    if isinstance(node, (list, tuple)):
        return {str(i): child for i, child in enumerate(node)}
    return {}


def mirror(state, params, select, init_leaf, keys=()):
    """Add ``params``' structure to the state node ``state`` and return the node.

    Containers are mirrored with the same kind (a tuple or namedtuple gives the same type;
    empty containers are kept). Each leaf for which ``select(keys, leaf)`` holds gets a
    slot dict, filled by ``init_leaf(keys, leaf, slots)`` when empty. Existing entries are kept,
    so mirroring is additive and idempotent.
    """
    if isinstance(params, dict):
        node = as_dict(state)
        for key, child in params.items():
            if not is_container(child) and not select(keys + (key,), child):
                continue
            found = lookup(node, key)
            if found is not None and key not in node:
                del node[str(key)]  # normalise a round-tripped "0" back to 0
            node[key] = mirror(found, child, select, init_leaf, keys + (key,))
        return node
    if isinstance(params, (list, tuple)):
        node = as_list(state)
        node.extend({} for _ in range(len(params) - len(node)))
        for i, child in enumerate(params):
            if is_container(child) or select(keys + (i,), child):
                node[i] = mirror(node[i], child, select, init_leaf, keys + (i,))
        if isinstance(params, list):
            if isinstance(state, list):
                state[:] = node  # keep the list object that callers may hold
                return state
            return node
        return rebuild(params, node[: len(params)])
    slots = state if isinstance(state, dict) else {}
    if not slots:
        init_leaf(keys, params, slots)
    return slots


def as_list(node):
    """A state node that must mirror a list or tuple, as a new list."""
    if isinstance(node, (list, tuple)):
        return list(node)
    if isinstance(node, dict) and all(isinstance(k, str) and k.isdigit() for k in node):
        by_index = {int(k): child for k, child in node.items()}  # saved with string indices
        items: list[Any] = []
        for i in sorted(by_index):
            items.extend({} for _ in range(i - len(items)))
            items.append(by_index[i])
        return items
    return []


def assign(root, keys, value):
    """Set the leaf at ``keys`` to ``value`` inside ``root``; tuples on the way are rebuilt.
    Returns the root (a new object only when the root itself is a tuple)."""
    if not keys:
        return value
    key = keys[0]
    child = root[key]
    new_child = assign(child, keys[1:], value)
    if isinstance(root, tuple):
        items = list(root)
        items[key] = new_child
        return rebuild(root, items)
    if new_child is not child:
        root[key] = new_child
    return root
