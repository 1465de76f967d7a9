"""The checkpoint's content: every state array keyed by parameter path and slot, plus
metadata saying who owns what; and loading it back by name, checked, all or nothing.

Keys: ``"{path}/{slot}"`` for a parameter's slot (``layers.0.attn.weight/m``) and
``"@{optimizer}/{scalar}"`` for an optimizer's step, learning rate, scheduled values and the
rule's running values (schedule-free's weight sum); ``#`` starts whole-model state. A path that
starts with ``@`` or ``#`` gets a ``~`` before it (:func:`~treeopt.checkpoint.base.slot_key`),
so any parameter name round-trips.
"""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from treeopt import __version__, engine
from treeopt._trees import dotted
from treeopt.backends import array_backend, numpy_backend
from treeopt.checkpoint import routing, validate
from treeopt.checkpoint.base import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    Problem,
    assign,
    numpy_scalar,
    slot_key,
)
from treeopt.types import Array

if TYPE_CHECKING:
    from treeopt.checkpoint.base import Stored
    from treeopt.optimizer import Optimizer


@dataclass
class LoadReport:
    """What a load found: every problem, and what it loaded."""

    problems: list = field(default_factory=list)
    loaded: list = field(default_factory=list)  # parameter paths whose state was loaded

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"loaded the state of {len(self.loaded)} parameters"
        if self.ok:
            return head + ", no problem found"
        return "\n".join([f"{head}; {len(self.problems)} problems:"] + [f"  {p}" for p in self.problems])


# ---------------------------------------------------------------------------------- saving
def leaf_optimizers(optimizer: Optimizer) -> list[tuple[str, tuple[int, ...], Optimizer]]:
    """``(name, position, optimizer)`` for every optimizer that holds state, in order."""
    return optimizer.named_stateful()


def _json_value(value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if callable(value):
        return {"schedule": getattr(value, "__qualname__", type(value).__name__)}
    return repr(value)


def hyperparameters(optimizer: Optimizer) -> dict[str, Any]:
    return {n: _json_value(getattr(optimizer, n, None)) for n in optimizer.hyperparameters}


def _shape_dtype(array):
    backend = array_backend(array)
    return {"shape": list(backend.shape(array)), "dtype": backend.dtype_name(array)}


def to_flat(optimizer: Optimizer, known: Iterable[str] = ()) -> tuple[dict[str, Array], dict[str, Any]]:
    """``(tensors, metadata)``: the state arrays by key (arrays of the state's own library,
    not copied) and a JSON-able description of who owns what.

    ``known`` adds parameter paths that have no state yet (a group that has not stepped, a
    layer that got no gradient): they are recorded with no slots, so loading into a fresh
    optimizer that initialised them does not call them missing.
    """
    tensors: dict[str, Array] = {}
    optimizers: list[dict[str, Any]] = []
    parameters: dict[str, dict[str, Any]] = {}

    def put(key, value):
        if key in tensors:
            raise CheckpointError(f"two state entries have the key {key!r}: rename one of the parameters")
        tensors[key] = value

    for name, position, leaf in leaf_optimizers(optimizer):
        for scalar in leaf.scalar_names():
            put(f"@{name}/{scalar}", leaf.state[scalar])
        for keys, slots in engine.slot_items(leaf):
            path = dotted(keys)
            if path in parameters:
                raise CheckpointError(f"two parameters have the path {path!r}: rename one of them")
            parameters[path] = {"owner": name, "slots": {s: _shape_dtype(v) for s, v in slots.items()}}
            for slot, value in slots.items():
                put(slot_key(path, slot), value)
        optimizers.append(
            {
                "name": name,
                "position": list(position),
                "type": type(leaf).__name__,
                "hyperparameters": hyperparameters(leaf),
                "scheduled": sorted(leaf.schedules),
                "running": [
                    n for n in leaf.scalar_names() if n not in ("step", "learning_rate") and n not in leaf.schedules
                ],
            }
        )
    names = {id(leaf): name for name, _, leaf in leaf_optimizers(optimizer)}
    for placed in optimizer.routing_table():  # known paths without state
        parameters.setdefault(dotted(placed.keys), {"owner": names.get(id(placed.owner)), "slots": {}})
    for path in known:
        parameters.setdefault(path, {"owner": None, "slots": {}})
    for key, value in routing.carried_tensors(optimizer, leaf_optimizers(optimizer)).items():
        put(key, value)
    extra = {}
    for name, value in optimizer.whole_model_state().items():
        if name == "accumulated":
            for path, array in value.items():
                put(f"#accumulated/{path}", array)
        else:
            extra[name] = value if isinstance(value, int) else None
            if not isinstance(value, int):
                put(f"#{name}", value)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "treeopt_version": __version__,
        "whole_model": {k: v for k, v in extra.items() if v is not None},
        "step": int(numpy_scalar(leaf_optimizers(optimizer)[0][2].step)),
        "optimizers": optimizers,
        "parameters": parameters,
    }
    changes = routing.to_metadata(optimizer)
    if changes:
        metadata["routing"] = changes
    return tensors, metadata


# ---------------------------------------------------------------------------------- loading
def _match_optimizers(current, metadata):
    """Each current optimizer's saved counterpart: the one that owned most of its
    parameters; else the one with its name; else the one at its position."""
    saved = {o["name"]: o for o in metadata["optimizers"]}
    owner = {path: info["owner"] for path, info in metadata["parameters"].items()}
    matches = {}
    for name, position, leaf in current:
        kind = type(leaf).__name__
        votes = Counter(
            owner[dotted(keys)]
            for keys, _ in engine.slot_items(leaf)
            if owner.get(dotted(keys)) in saved and saved[owner[dotted(keys)]]["type"] == kind
        )
        if votes:
            matches[id(leaf)] = saved[votes.most_common(1)[0][0]]
        elif name in saved and saved[name]["type"] == kind:
            matches[id(leaf)] = saved[name]
        else:
            matches[id(leaf)] = next(
                (o for o in saved.values() if o["position"] == list(position) and o["type"] == kind), None
            )
    return matches


def from_flat(
    optimizer: Optimizer,
    tensors: Stored,
    metadata: dict[str, Any],
    strict: bool = True,
    check_hyperparameters: bool = True,
) -> LoadReport:
    """Load ``tensors`` into ``optimizer``'s state, matched by parameter path.

    The optimizer must know its parameters (initialised, or after a step). Every problem is
    collected into one :class:`LoadReport`. With ``strict`` (the default) any problem raises
    :class:`CheckpointError` and nothing changes; otherwise what matches is loaded and the
    report is returned. ``check_hyperparameters=False``: a hyper-parameter that differs from
    the saved one is not a problem (the caller restores the saved values, as
    ``treeopt.torch.Optimizer.load_state_dict`` does).
    """
    validate.metadata(metadata)
    validate.tensors(tensors, metadata)
    report = LoadReport()
    current = leaf_optimizers(optimizer)
    matches = _match_optimizers(current, metadata)
    saved_params = metadata["parameters"]
    saved_types = {o["name"]: o["type"] for o in metadata["optimizers"]}
    writes: list[
        tuple[dict[str, Array], str, Array]
    ] = []  # (slots dict, slot name, saved array), applied only after every check
    seen = set()

    for name, _, leaf in current:
        for keys, slots in engine.slot_items(leaf):
            path = dotted(keys)
            seen.add(path)
            saved = saved_params.get(path)
            if saved is None:
                report.problems.append(Problem("missing", path, "no state for this parameter in the checkpoint"))
                continue
            if not saved["slots"]:
                continue  # known but without state when saved: the fresh state is right
            saved_type, current_type = saved_types.get(saved["owner"]), type(leaf).__name__
            if saved_type != current_type:
                report.problems.append(
                    Problem(
                        "owner",
                        path,
                        f"owned by {saved_type} ({saved['owner']}) in the checkpoint, by {current_type} ({name}) now",
                    )
                )
                continue
            if set(saved["slots"]) != set(slots):
                report.problems.append(
                    Problem("slots", path, f"slots {sorted(saved['slots'])} in the checkpoint, {sorted(slots)} now")
                )
                continue
            fits = True
            for slot, value in slots.items():
                expected, found = _shape_dtype(value), saved["slots"][slot]
                key = slot_key(path, slot)
                if key not in tensors:
                    report.problems.append(Problem("missing", key, "listed in the metadata but not stored"))
                    fits = False
                    continue
                stored_shape, stored_dtype = _spec(tensors, key)
                if found["shape"] != expected["shape"] or stored_shape != expected["shape"]:
                    report.problems.append(
                        Problem(
                            "shape",
                            key,
                            f"shape {tuple(found['shape'])} in the checkpoint, {tuple(expected['shape'])} now",
                        )
                    )
                    fits = False
                elif found["dtype"] != expected["dtype"] or stored_dtype != expected["dtype"]:
                    report.problems.append(
                        Problem("dtype", key, f"dtype {found['dtype']} in the checkpoint, {expected['dtype']} now")
                    )
                    fits = False
            if fits:
                writes.extend((slots, slot, slot_key(path, slot)) for slot in slots)  # read when written
                report.loaded.append(path)
    for path, saved in saved_params.items():
        if path not in seen and saved["slots"]:
            report.problems.append(
                Problem("unexpected", path, "in the checkpoint but not a parameter of this optimizer")
            )

    scalar_writes = []
    for name, _, leaf in current:
        saved = matches[id(leaf)]
        if saved is None:
            report.problems.append(Problem("optimizer", name, f"no {type(leaf).__name__} in the checkpoint matches it"))
            continue
        ours = hyperparameters(leaf) if check_hyperparameters else {}
        for key, value in saved["hyperparameters"].items():
            if key in ours and ours[key] != value and not isinstance(value, dict) and not isinstance(ours[key], dict):
                report.problems.append(
                    Problem("hyperparameter", name, f"{key} is {value!r} in the checkpoint, {ours[key]!r} now")
                )
        for scalar in leaf.scalar_names():
            key = f"@{saved['name']}/{scalar}"
            if key not in tensors:
                report.problems.append(Problem("missing", f"@{name}/{scalar}", "not in the checkpoint"))
            else:
                scalar_writes.append((leaf, scalar, tensors[key]))

    whole_model = _check_whole_model_state(optimizer, tensors, metadata, report)
    if strict and report.problems:
        raise CheckpointError(f"the checkpoint does not fit the optimizer (nothing was loaded): {report}", report)
    if whole_model:
        _load_whole_model_state(optimizer, tensors, metadata)
    for slots, slot, key in writes:
        assign(slots, slot, tensors[key])  # one tensor read at a time
    for leaf, scalar, array in scalar_writes:
        _assign_scalar(leaf, scalar, array)
    for _, _, leaf in current:
        leaf.book.initialized = True
    return report


def _spec(tensors, key):
    """``(shape list, dtype name)`` of a stored tensor, without reading it if possible."""
    if hasattr(tensors, "spec"):
        return tensors.spec(key)
    array = tensors[key]
    backend = array_backend(array)
    return list(backend.shape(array)), backend.dtype_name(array)


def _check_whole_model_state(optimizer, tensors, metadata, report):
    """Whether the optimizer takes whole-model state (a MultiOptimizer); each accumulation
    buffer must have its parameter's shape and dtype."""
    keys = [k for k in tensors.keys() if k.startswith("#accumulated/") or k == "#grad_norm"]
    if optimizer.stateful() == [optimizer]:
        for name in [*metadata.get("whole_model", {}), *keys]:
            report.problems.append(
                Problem(
                    "unexpected", name, f"whole-model state, and {type(optimizer).__name__} is not a MultiOptimizer"
                )
            )
        return False
    known = {dotted(p.keys): (p.shape, p.dtype) for p in optimizer.routing_table()}
    for key in keys:
        if key == "#grad_norm":
            continue
        path = key[len("#accumulated/") :]
        shape, dtype = _spec(tensors, key)
        info = known.get(path)
        if info is None:  # not seen yet: checked against its gradient at the next step
            if path not in metadata["parameters"]:
                report.problems.append(Problem("unexpected", key, "an accumulation buffer of no parameter"))
        elif (tuple(shape), dtype) != (tuple(info[0]), info[1]):
            report.problems.append(
                Problem(
                    "shape",
                    key,
                    f"an accumulation buffer of {dtype}{list(shape)}; the parameter is {info[1]}{list(info[0])}",
                )
            )
    return True


def _load_whole_model_state(optimizer, tensors, metadata):
    if optimizer.stateful() == [optimizer]:
        return  # only a MultiOptimizer keeps state for the whole model
    state = optimizer.state
    for key in optimizer.whole_model_state():
        del state[key]
    state.update(metadata.get("whole_model", {}))
    backend = optimizer.stateful()[0].book.backend or numpy_backend
    accumulated = {}
    for key in [k for k in tensors.keys() if k.startswith("#") and not k.startswith("#carried/")]:
        array = tensors[key]
        if key.startswith("#accumulated/"):
            accumulated[key[len("#accumulated/") :]] = backend.from_numpy(
                np.asarray(array_backend(array).to_numpy(array))
            )
        else:
            state[key[1:]] = backend.from_numpy(np.asarray(array_backend(array).to_numpy(array)))
    if accumulated or "micro_step" in state:
        state["accumulated"] = accumulated


def _assign_scalar(leaf, scalar, array):
    """A state scalar (checked by :mod:`.validate`: 0-d, a step >= 0, a finite float)."""
    value = numpy_scalar(array)
    backend = leaf.book.backend or numpy_backend
    dtype = "uint64" if scalar == "step" else value.dtype.name
    if dtype not in ("uint64", "float16", "bfloat16", "float32"):
        dtype = "float32"
    leaf.state[scalar] = backend.scalar_array(
        value.astype(np.float64) if dtype != "uint64" else value.astype(np.uint64), dtype
    )
