"""Routing changes in a checkpoint: what ``freeze``, ``unfreeze`` and ``reroute`` did to each
MultiOptimizer, and the slots a ``reroute(..., state="carry")`` hands over.

Filters decide the route of a parameter the first time it is seen, so a fresh optimizer
routes by its filters again; what the filters cannot redo is saved: the metadata's
``routing`` lists, for every MultiOptimizer (by position), the parameters that are frozen,
re-routed or unfrozen by hand, with their keys (as a JSON list, so ``0`` and ``"0"`` stay
apart), shape, dtype and the name of the optimizer they go to, and the log of changes.
Slots carried by a re-route and not yet taken up are stored as ``#carried/{path}/{slot}``.

A load restores the routing before it creates any state, so each parameter's slots are
created by, and loaded into, the optimizer that owned them when the file was saved.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from treeopt._trees import dotted
from treeopt.backends import array_backend, numpy_backend
from treeopt.checkpoint.base import CheckpointError, Problem, assign
from treeopt.routing import Member, Route, Routed
from treeopt.types import Array, Keys, Tree

if TYPE_CHECKING:
    from treeopt.checkpoint.base import Stored
    from treeopt.optimizer import Optimizer

CARRIED = "#carried/"


def to_metadata(optimizer: Optimizer) -> list[dict[str, Any]]:
    """The ``routing`` entry of the metadata."""
    nodes = []
    for position, multi in optimizer.router.routers():
        paths = []
        for keys, route in multi.routes().items():
            flags = [
                name
                for name, found in (
                    ("frozen", route.frozen),
                    ("rerouted", route.reason == "rerouted"),
                    ("unfrozen", route.unfrozen),
                    # moved when kinds were learned (a trace of the forward pass), which a fresh
                    # optimizer may not know yet when it loads
                    ("revised", route.reason.startswith("revised:")),
                )
                if found
            ]
            if flags:
                paths.append(
                    {
                        "keys": list(keys),
                        "shape": list(route.shape),
                        "dtype": route.dtype,
                        "route": None if route.group is None else multi.names[route.group],
                        "flags": flags,
                    }
                )
        if paths or multi.changes:
            nodes.append(
                {"position": list(position), "names": list(multi.names), "paths": paths, "changes": list(multi.changes)}
            )
    return nodes


def carried_tensors(groups: Iterable[Member]) -> dict[str, Array]:
    """``{"#carried/{path}/{slot}": array}`` of slots handed over by a re-route and not
    taken up yet (the parameter has not stepped on its new optimizer)."""
    found = {}
    for _, _, group in groups:
        for keys, slots in group.store.carried.items():
            for slot, value in slots.items():
                found[f"{CARRIED}{dotted(keys)}/{slot}"] = value
    return found


def restore(optimizer: Optimizer, metadata: dict[str, Any]) -> None:
    """Apply the saved routing changes to ``optimizer`` (checked first; raises
    :class:`CheckpointError` naming the path when they cannot apply)."""
    nodes = metadata.get("routing", [])
    if not nodes:
        return
    found = dict(optimizer.router.routers())
    plans: list[tuple[Any, ...]] = []
    for i, node in enumerate(nodes):
        multi = found.get(tuple(node["position"]))
        if multi is None:
            raise CheckpointError(
                f"checkpoint routing[{i}]: the checkpoint has routing changes for a MultiOptimizer "
                f"at position {node['position']}, and this optimizer has none there"
            )
        if sorted(node["names"]) != sorted(multi.names):
            raise CheckpointError(
                f"checkpoint routing[{i}]: saved for a MultiOptimizer with the groups {node['names']}, "
                f"and this one has {multi.names}"
            )
        index = {name: k for k, name in enumerate(multi.names)}
        current = multi.routes()
        for entry in node["paths"]:
            keys, shape, dtype = tuple(entry["keys"]), tuple(entry["shape"]), entry["dtype"]
            known = current.get(keys)
            if known is not None and (tuple(known.shape), known.dtype) != (shape, dtype):
                raise CheckpointError(
                    f"checkpoint routing: {dotted(keys)!r} is {dtype}{list(shape)} in the checkpoint but "
                    f"{known.dtype}{list(known.shape)} now"
                )
            if entry["route"] is not None and entry["route"] not in index:
                raise CheckpointError(
                    f"checkpoint routing: {dotted(keys)!r} goes to {entry['route']!r}, and this MultiOptimizer has "
                    f"no optimizer of that name ({multi.names})"
                )
            plans.append((multi, keys, (shape, dtype), index.get(entry["route"]), entry["flags"]))
        plans.append((multi, None, node["changes"], None, None))
    routes = {id(multi): multi.routes() for multi in found.values()}
    for multi, keys, info, target, flags in plans:
        if keys is None:
            multi.changes = list(info)
            continue
        known = routes[id(multi)].get(keys) or Route(*info)
        if target is not None and known.group != target:
            known = replace(known, group=target, also=(), notes=())
        if "rerouted" in flags:
            known = replace(known, reason="rerouted")
        elif "revised" in flags and not known.reason.startswith("revised:"):
            known = replace(known, reason=f"revised: {known.reason} (as saved)")
        known = routes[id(multi)][keys] = replace(known, frozen="frozen" in flags, unfrozen="unfrozen" in flags)
        multi.restore(keys, known)


def mirror_frozen(optimizer: Optimizer, metadata: dict[str, Any], params: Tree) -> None:
    """Create the state of parameters frozen after they had state (``freeze`` keeps it for
    ``unfreeze``), so the saved state has somewhere to go: ``init`` skips frozen parameters."""
    saved = metadata.get("parameters", {})
    for _, multi in optimizer.router.routers():
        for keys, route in multi.routes().items():
            owner = multi.owner(keys) if route.frozen else None
            if owner is not None and saved.get(dotted(keys), {}).get("slots") and not owner.store.slots(keys):
                owner.store.create(params, {keys}, owner.init_single, {keys: route.options})


def check_carried(
    optimizer: Optimizer, metadata: dict[str, Any], tensors: Stored
) -> tuple[list[tuple[Routed, Keys, str, Array]], list[Problem]]:
    """``(writes, problems)`` for the saved carried slots: each goes to the optimizer that
    now owns its parameter, and must be a slot of that optimizer, of the right shape and dtype."""
    entries = {
        dotted(tuple(e["keys"])): (tuple(node["position"]), e)
        for node in metadata.get("routing", [])
        for e in node["paths"]
    }
    found = dict(optimizer.router.routers())
    writes, problems = [], []
    for key in [k for k in tensors.keys() if k.startswith(CARRIED)]:
        path, _, slot = key[len(CARRIED) :].rpartition("/")
        position, entry = entries[path]
        keys = tuple(entry["keys"])
        owner = found[position].owner(keys) if position in found else None
        if owner is None or owner.rule is None:
            problems.append(Problem("carried", path, f"slot {slot!r} was carried to an optimizer that cannot take it"))
            continue
        route = found[position].entry(keys)
        options = None if route is None else route.options
        expected = owner.store.expected(tuple(entry["shape"]), entry["dtype"], keys, options)
        array = tensors[key]
        source = array_backend(array)
        shape, dtype = list(source.shape(array)), source.dtype_name(array)
        if slot not in expected or list(expected[slot].shape) != shape or dtype != expected[slot].dtype:
            want = f"{entry['dtype']}{list(expected[slot].shape)}" if slot in expected else f"one of {sorted(expected)}"
            problems.append(
                Problem(
                    "carried", path, f"carried slot {slot!r} is {dtype}{shape}; {type(owner).__name__} expects {want}"
                )
            )
            continue
        writes.append((owner, keys, slot, array))
    return writes, problems


def apply_carried(writes: Iterable[tuple[Routed, Keys, str, Array]]) -> None:
    """Put the checked carried slots in place: into the slots when the parameter has state
    already, else kept for its first step on its new optimizer."""
    for owner, keys, slot, array in writes:
        slots = owner.store.slots(keys)
        if slots and slot in slots:
            assign(slots, slot, array)
            continue
        source, target = array_backend(array), owner.store.backend or numpy_backend
        value = array if source is target else target.from_numpy(source.to_numpy(array))
        owner.store.carry(keys, {slot: value})
