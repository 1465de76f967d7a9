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
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from treeopt._trees import dotted
from treeopt._version import __version__
from treeopt.backends import array_backend, numpy_backend
from treeopt.checkpoint import routing, validate
from treeopt.checkpoint.base import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    LoadReport,
    Problem,
    assign,
    numpy_scalar,
    slot_key,
)
from treeopt.multi import MultiOptimizer
from treeopt.precision.codes import BLOCK
from treeopt.precision.formats import Form, slot_names, stored_form
from treeopt.types import Array

if TYPE_CHECKING:
    from treeopt.checkpoint.base import Stored
    from treeopt.optimizer import Optimizer


# ---------------------------------------------------------------------------------- saving
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

    for name, position, group in optimizer.groups():
        for scalar in group.scalars.names():
            put(f"@{name}/{scalar}", group.scalars.value(scalar))
        for keys, slots in group.store.items():
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
                "type": type(group).__name__,
                "hyperparameters": hyperparameters(group),
                "scheduled": sorted(group.scalars.schedules),
                "running": [
                    n
                    for n in group.scalars.names()
                    if n not in ("step", "learning_rate") and n not in group.scalars.schedules
                ],
            }
        )
        if group.store.precision is not None:  # how its slots are stored (codes and scales of int8 slots)
            optimizers[-1]["state_dtype"] = asdict(group.store.precision)
    names = {id(group): name for name, _, group in optimizer.groups()}
    for keys, _, owner in optimizer.router.table():  # known paths without state
        parameters.setdefault(dotted(keys), {"owner": names.get(id(owner)), "slots": {}})
    for path in known:
        parameters.setdefault(path, {"owner": None, "slots": {}})
    for key, value in routing.carried_tensors(optimizer.groups()).items():
        put(key, value)
    extra = {}
    for name, value in _whole_model(optimizer).items():
        if name == "accumulated":
            for path, array in value.items():
                put(f"#accumulated/{path}", array)
        else:
            extra[name] = value if isinstance(value, int) else None
            if not isinstance(value, int):
                put(f"#{name}", value)
    metadata = {
        "format": FORMAT,
        # a file without a state_dtype is what format 1 readers know
        "format_version": FORMAT_VERSION if any("state_dtype" in o for o in optimizers) else 1,
        "treeopt_version": __version__,
        "whole_model": {k: v for k, v in extra.items() if v is not None},
        "step": int(numpy_scalar(optimizer.groups()[0].group.step)),
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
    for name, position, group in current:
        kind = type(group).__name__
        votes = Counter(
            owner[dotted(keys)]
            for keys, _ in group.store.items()
            if owner.get(dotted(keys)) in saved and saved[owner[dotted(keys)]]["type"] == kind
        )
        if votes:
            matches[id(group)] = saved[votes.most_common(1)[0][0]]
        elif name in saved and saved[name]["type"] == kind:
            matches[id(group)] = saved[name]
        else:
            matches[id(group)] = next(
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
    current = optimizer.groups()
    matches = _match_optimizers(current, metadata)
    saved_params = metadata["parameters"]
    saved_types = {o["name"]: o["type"] for o in metadata["optimizers"]}
    saved_blocks = {o["name"]: o.get("state_dtype", {}).get("block", BLOCK) for o in metadata["optimizers"]}
    # slots stored in another form load read back and stored anew only where a state_dtype is
    # involved; between two optimizers without one, another dtype is a problem, as it always was
    saved_compact = {o["name"] for o in metadata["optimizers"] if "state_dtype" in o}
    converts: list[tuple[Any, Any, dict[str, Array], str, dict[str, Form]]] = []
    writes: list[
        tuple[dict[str, Array], str, Array]
    ] = []  # (slots dict, slot name, saved array), applied only after every check
    seen = set()

    for name, _, group in current:
        for keys, slots in group.store.items():
            path = dotted(keys)
            seen.add(path)
            saved = saved_params.get(path)
            if saved is None:
                report.problems.append(Problem("missing", path, "no state for this parameter in the checkpoint"))
                continue
            if not saved["slots"]:
                continue  # known but without state when saved: the fresh state is right
            saved_type, current_type = saved_types.get(saved["owner"]), type(group).__name__
            if saved_type != current_type:
                report.problems.append(
                    Problem(
                        "owner",
                        path,
                        f"owned by {saved_type} ({saved['owner']}) in the checkpoint, by {current_type} ({name}) now",
                    )
                )
                continue
            saved_names, current_names = slot_names(list(saved["slots"])), slot_names(list(slots))
            if set(saved_names) != set(current_names):
                report.problems.append(
                    Problem(
                        "slots", path, f"slots {sorted(saved_names)} in the checkpoint, {sorted(current_names)} now"
                    )
                )
                continue
            compact = group.store.precision is not None or saved["owner"] in saved_compact
            if compact and any(saved["slots"].get(slot) != _shape_dtype(value) for slot, value in slots.items()):
                # stored in another form (another state_dtype): read back and stored anew
                forms = _stored_forms(group.store, keys, path, saved, saved_blocks.get(saved["owner"], BLOCK), report)
                if forms is not None:
                    converts.append((group.store, keys, slots, path, forms))
                    report.loaded.append(path)
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
    for name, _, group in current:
        saved = matches[id(group)]
        if saved is None:
            report.problems.append(
                Problem("optimizer", name, f"no {type(group).__name__} in the checkpoint matches it")
            )
            continue
        ours = hyperparameters(group) if check_hyperparameters else {}
        for key, value in saved["hyperparameters"].items():
            if key in ours and ours[key] != value and not isinstance(value, dict) and not isinstance(ours[key], dict):
                report.problems.append(
                    Problem("hyperparameter", name, f"{key} is {value!r} in the checkpoint, {ours[key]!r} now")
                )
        for scalar in group.scalars.names():
            key = f"@{saved['name']}/{scalar}"
            if key not in tensors:
                report.problems.append(Problem("missing", f"@{name}/{scalar}", "not in the checkpoint"))
            else:
                scalar_writes.append((group, scalar, tensors[key]))

    whole_model = _check_whole_model_state(optimizer, tensors, metadata, report)
    if strict and report.problems:
        raise CheckpointError(f"the checkpoint does not fit the optimizer (nothing was loaded): {report}", report)
    if whole_model:
        _load_whole_model_state(optimizer, tensors, metadata)
    for slots, slot, key in writes:
        assign(slots, slot, tensors[key])  # one tensor read at a time
    for store, keys, slots, path, forms in converts:
        _convert(store, keys, slots, path, forms, tensors)
    for group, scalar, array in scalar_writes:
        _assign_scalar(group, scalar, array)
    for _, _, group in current:
        group.store.checked = True
    return report


def _stored_forms(store, keys, path, saved, block, report):
    """The stored form of each slot of ``path`` in the checkpoint, checked against the slots
    the parameter needs now; ``None`` (with the problems reported) when they do not fit."""
    shape, _ = store.parameters[keys]
    wanted = store.slot_shapes(shape, keys)
    entries = {k: (tuple(v["shape"]), v["dtype"]) for k, v in saved["slots"].items()}
    forms = {}
    for slot, slot_shape in wanted.items():
        form = stored_form({k: v for k, v in entries.items() if k in (slot, f"{slot}_scale")}, slot, block)
        if isinstance(form, str):
            report.problems.append(Problem("stored", slot_key(path, slot), form))
        elif entries[slot][0] != tuple(slot_shape):
            report.problems.append(
                Problem(
                    "shape",
                    slot_key(path, slot),
                    f"shape {entries[slot][0]} in the checkpoint, {tuple(slot_shape)} now",
                )
            )
        else:
            forms[slot] = form
    return forms if len(forms) == len(wanted) else None


def _convert(store, keys, slots, path, forms, tensors):
    """Write the saved slots of ``path`` (read back from their stored ``forms``) in the form
    ``store`` keeps them now. No step: bfloat16 is rounded to nearest."""
    shape, dtype = store.parameters[keys]
    layout = store.layout(shape, dtype, keys)
    compute = layout.compute if layout is not None else dtype
    for slot, form in forms.items():
        arrays = {
            k: np.asarray(array_backend(tensors[slot_key(path, k)]).to_numpy(tensors[slot_key(path, k)]))
            for k in (slot, f"{slot}_scale")
            if slot_key(path, k) in tensors
        }
        value = form.load(numpy_backend, arrays, slot, "float64" if compute == "float64" else "float32")
        if layout is None:
            entries = {slot: numpy_backend.astype(value, dtype)}
        else:
            entries = layout.forms[slot].encode(numpy_backend, slot, value, None)
        for key, array in entries.items():
            assign(slots, key, array)


def _whole_model(optimizer):
    """The state entries kept for the whole model rather than by a group (a MultiOptimizer's
    last norm, skipped steps, accumulation): the live dict's entries, or ``{}``."""
    return optimizer.whole_model.entries() if isinstance(optimizer, MultiOptimizer) else {}


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
    if not isinstance(optimizer, MultiOptimizer):
        for name in [*metadata.get("whole_model", {}), *keys]:
            report.problems.append(
                Problem(
                    "unexpected", name, f"whole-model state, and {type(optimizer).__name__} is not a MultiOptimizer"
                )
            )
        return False
    known = {dotted(keys): (route.shape, route.dtype) for keys, route, _ in optimizer.router.table()}
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
    if not isinstance(optimizer, MultiOptimizer):
        return  # only a MultiOptimizer keeps state for the whole model
    state = optimizer.state
    for key in _whole_model(optimizer):
        del state[key]
    state.update(metadata.get("whole_model", {}))
    backend = optimizer.groups()[0].group.store.backend or numpy_backend
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


def _assign_scalar(group, scalar, array):
    """A state scalar (checked by :mod:`.validate`: 0-d, a step >= 0, a finite float)."""
    value = numpy_scalar(array)
    backend = group.store.backend or numpy_backend
    dtype = "uint64" if scalar == "step" else value.dtype.name
    if dtype not in ("uint64", "float16", "bfloat16", "float32"):
        dtype = "float32"
    group.store.tree[scalar] = backend.scalar_array(
        value.astype(np.float64) if dtype != "uint64" else value.astype(np.uint64), dtype
    )
