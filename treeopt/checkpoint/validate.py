"""What a checkpoint may hold, checked before anything is loaded.

A checkpoint's checksum proves the file is the one that was written, not that it was
written by treeopt: a file made by hand (or by a bug) can carry a valid checksum and any
content. So every value is checked against the format before the loader touches the
optimizer: the type of every metadata field, the shape and dtype of every stored scalar and
array, and every key, known or not. Each failure is a :class:`CheckpointError` that names
the key and what was expected.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NoReturn, TypeGuard

import numpy as np

from treeopt._trees import dotted
from treeopt.backends import backend_of
from treeopt.checkpoint.base import FORMAT, FORMAT_VERSION, CheckpointError, numpy_scalar, slot_key, split_slot_key

if TYPE_CHECKING:
    from treeopt.checkpoint.base import Stored

#: dtypes a state array may have
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: dtypes a state scalar (learning rate, scheduled value) may have
SCALAR_DTYPES = ("float16", "bfloat16", "float32")
#: whole-model counters kept in the metadata (non-negative integers)
WHOLE_MODEL_COUNTERS = ("micro_step", "skipped_steps")
#: whole-model arrays kept as tensors: ``#grad_norm``, ``#accumulated/{path}``, ``#carried/{path}/{slot}``
WHOLE_MODEL_ARRAYS = ("grad_norm",)
ROUTING_FLAGS = ("frozen", "rerouted", "unfrozen")
_TOP_LEVEL = (
    "format",
    "format_version",
    "treeopt_version",
    "step",
    "whole_model",
    "optimizers",
    "parameters",
    "routing",
    "checksum",
)


def _fail(where: str, message: str) -> NoReturn:
    raise CheckpointError(f"checkpoint metadata {where}: {message}")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(value, kind, where, what):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _fail(where, f"must be {what}, got {type(value).__name__} {_short(value)}")
    return value


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _counter(value, where):
    if not _is_int(value) or value < 0:
        _fail(where, f"must be a non-negative integer, got {_short(value)}")
    return value


def _shape(value, where):
    _expect(value, list, where, "a list of non-negative integers")
    for i, n in enumerate(value):
        _counter(n, f"{where}[{i}]")
    return value


def _keys(value, where):
    """A parameter's keys as saved in JSON: a non-empty list of strings and integers."""
    _expect(value, list, where, "a list of keys (strings and integers)")
    if not value or not all(isinstance(k, str) or _is_int(k) for k in value):
        _fail(where, f"must be a non-empty list of strings and integers, got {_short(value)}")
    return tuple(value)


def _hyper_value(value, where):
    if value is None or isinstance(value, (bool, str)) or _is_int(value):
        return
    if isinstance(value, float):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _hyper_value(v, f"{where}[{i}]")
        return
    if isinstance(value, dict) and set(value) == {"schedule"} and isinstance(value["schedule"], str):
        return
    _fail(where, f"must be a number, string, boolean, null, list or {{'schedule': name}}, got {_short(value)}")


def metadata(meta: Any) -> dict[str, Any]:
    """Check the types of every field of treeopt ``meta``data; returns it."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"not a treeopt checkpoint of optimizer state (format {found!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        _fail("'format_version'", f"must be a positive integer, got {_short(version)}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format {version} is newer than this treeopt reads ({FORMAT_VERSION}); upgrade treeopt"
        )
    unknown = sorted(set(meta) - set(_TOP_LEVEL))
    if unknown:
        _fail(f"{unknown[0]!r}", f"is not a field of format {FORMAT_VERSION} (known: {', '.join(_TOP_LEVEL)})")
    if "treeopt_version" in meta:
        _expect(meta["treeopt_version"], str, "'treeopt_version'", "a string")
    if "step" in meta:
        _counter(meta["step"], "'step'")
    whole = _expect(meta.get("whole_model", {}), dict, "'whole_model'", "a dict")
    for key, value in whole.items():
        if key not in WHOLE_MODEL_COUNTERS:
            _fail(f"'whole_model.{key}'", f"is not a whole-model counter (known: {', '.join(WHOLE_MODEL_COUNTERS)})")
        _counter(value, f"'whole_model.{key}'")
    optimizers = _expect(meta.get("optimizers"), list, "'optimizers'", "a list")
    names = set()
    for i, entry in enumerate(optimizers):
        where = f"'optimizers[{i}]'"
        _expect(entry, dict, where, "a dict")
        for field, kind, what in (
            ("name", str, "a string"),
            ("type", str, "a string"),
            ("position", list, "a list of integers"),
            ("hyperparameters", dict, "a dict"),
        ):
            if field not in entry:
                _fail(where, f"has no {field!r}")
            _expect(entry[field], kind, f"'optimizers[{i}].{field}'", what)
        _shape(entry["position"], f"'optimizers[{i}].position'")
        for name, value in entry["hyperparameters"].items():
            _hyper_value(value, f"'optimizers[{i}].hyperparameters.{name}'")
        scheduled = _expect(entry.get("scheduled", []), list, f"'optimizers[{i}].scheduled'", "a list of names")
        if not all(isinstance(s, str) for s in scheduled):
            _fail(f"'optimizers[{i}].scheduled'", f"must be a list of names, got {_short(scheduled)}")
        running = _expect(entry.get("running", []), list, f"'optimizers[{i}].running'", "a list of names")
        if not all(isinstance(s, str) for s in running):
            _fail(f"'optimizers[{i}].running'", f"must be a list of names, got {_short(running)}")
        if entry["name"] in names:
            _fail(f"'optimizers[{i}].name'", f"{entry['name']!r} is used twice")
        names.add(entry["name"])
    parameters = _expect(meta.get("parameters"), dict, "'parameters'", "a dict")
    for path, info in parameters.items():
        where = f"'parameters.{path}'"
        _expect(info, dict, where, "a dict with 'owner' and 'slots'")
        if set(info) != {"owner", "slots"}:
            _fail(where, f"must have exactly 'owner' and 'slots', got {sorted(info)}")
        owner = info["owner"]
        if owner is not None and (not isinstance(owner, str) or owner not in names):
            _fail(f"{where[:-1]}.owner'", f"{_short(owner)} is not one of the optimizers {sorted(names)}")
        slots = _expect(info["slots"], dict, f"{where[:-1]}.slots'", "a dict")
        if slots and owner is None:
            _fail(where, "has slots but no owner")
        for slot, spec in slots.items():
            at = f"'parameters.{path}.slots.{slot}'"
            _expect(spec, dict, at, "a dict with 'shape' and 'dtype'")
            if set(spec) != {"shape", "dtype"}:
                _fail(at, f"must have exactly 'shape' and 'dtype', got {sorted(spec)}")
            _shape(spec["shape"], f"{at[:-1]}.shape'")
            if spec["dtype"] not in FLOAT_DTYPES:
                _fail(f"{at[:-1]}.dtype'", f"must be one of {', '.join(FLOAT_DTYPES)}, got {_short(spec['dtype'])}")
    routing(meta.get("routing", []))
    return meta


def routing(nodes: Any) -> None:
    """Check the routing changes of every MultiOptimizer (see :mod:`.routing`)."""
    _expect(nodes, list, "'routing'", "a list")
    positions = set()
    for i, node in enumerate(nodes):
        where = f"'routing[{i}]'"
        _expect(node, dict, where, "a dict")
        if set(node) != {"position", "names", "paths", "changes"}:
            _fail(where, f"must have exactly 'position', 'names', 'paths' and 'changes', got {sorted(node)}")
        position = tuple(_shape(node["position"], f"'routing[{i}].position'"))
        if position in positions:
            _fail(f"'routing[{i}].position'", f"{list(position)} appears twice")
        positions.add(position)
        names = _expect(node["names"], list, f"'routing[{i}].names'", "a list of names")
        if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            _fail(f"'routing[{i}].names'", f"must be distinct strings, got {_short(names)}")
        changes = _expect(node["changes"], list, f"'routing[{i}].changes'", "a list of strings")
        if not all(isinstance(c, str) for c in changes):
            _fail(f"'routing[{i}].changes'", "must be a list of strings")
        seen = set()
        for j, entry in enumerate(_expect(node["paths"], list, f"'routing[{i}].paths'", "a list")):
            at = f"'routing[{i}].paths[{j}]'"
            _expect(entry, dict, at, "a dict")
            if set(entry) != {"keys", "shape", "dtype", "route", "flags"}:
                _fail(at, f"must have exactly 'keys', 'shape', 'dtype', 'route' and 'flags', got {sorted(entry)}")
            keys = _keys(entry["keys"], f"{at[:-1]}.keys'")
            if keys in seen:
                _fail(f"{at[:-1]}.keys'", f"{list(keys)} appears twice")
            seen.add(keys)
            _shape(entry["shape"], f"{at[:-1]}.shape'")
            if entry["dtype"] not in FLOAT_DTYPES:
                _fail(f"{at[:-1]}.dtype'", f"must be one of {', '.join(FLOAT_DTYPES)}, got {_short(entry['dtype'])}")
            route = entry["route"]
            if route is not None and route not in names:
                _fail(f"{at[:-1]}.route'", f"{_short(route)} is not one of {names}")
            flags = _expect(entry["flags"], list, f"{at[:-1]}.flags'", "a list")
            if not flags or not all(f in ROUTING_FLAGS for f in flags) or len(set(flags)) != len(flags):
                _fail(
                    f"{at[:-1]}.flags'", f"must be one or more distinct members of {ROUTING_FLAGS}, got {_short(flags)}"
                )
            if route is None and "frozen" not in flags:
                _fail(at, "a parameter that is not frozen must have a route")


def _spec(tensors, key):
    if hasattr(tensors, "spec"):
        return tensors.spec(key)
    array = tensors[key]
    backend = backend_of(array)
    if backend is None or backend.name == "python":
        raise CheckpointError(f"checkpoint tensor {key!r} is a {type(array).__name__}, not an array")
    return list(backend.shape(array)), backend.dtype_name(array)


def _value(tensors, key):
    return numpy_scalar(tensors[key])


def scalar(tensors: Stored, key: str, integer: bool, finite: bool = True) -> np.ndarray:
    """Check the stored state scalar ``key`` (0-d; an integer >= 0 for a step, a finite
    float otherwise); returns its value as a NumPy 0-d array."""
    shape, dtype = _spec(tensors, key)
    if shape != []:
        raise CheckpointError(f"checkpoint tensor {key!r} has shape {tuple(shape)}; a state scalar has shape ()")
    if integer:
        if not dtype.startswith(("uint", "int")) or dtype in ("uint8", "int8"):  # torch: int64, JAX: uint32
            raise CheckpointError(
                f"checkpoint tensor {key!r} is {dtype}; a step count is an integer of 16 bits or more"
            )
        value = _value(tensors, key)
        if int(value) < 0:
            raise CheckpointError(f"checkpoint tensor {key!r} is {int(value)}; a step count is >= 0")
        return value
    if dtype not in SCALAR_DTYPES:
        raise CheckpointError(f"checkpoint tensor {key!r} is {dtype}; a state scalar is one of {SCALAR_DTYPES}")
    value = _value(tensors, key)
    if finite and not math.isfinite(float(value)):
        raise CheckpointError(f"checkpoint tensor {key!r} is {float(value)}; a hyper-parameter must be finite")
    return value


def tensors(stored: Stored, meta: dict[str, Any]) -> dict[str, str]:
    """Check every stored key against ``meta`` (already checked by :func:`metadata`):
    slots match their metadata's shape and dtype, scalars are 0-d of the right kind, and
    no key is unknown. Returns ``{key: kind}``."""
    parameters = meta["parameters"]
    optimizers = {o["name"]: o for o in meta["optimizers"]}
    rerouted = {dotted(tuple(e["keys"])) for node in meta.get("routing", []) for e in node["paths"]}
    kinds = {}
    for key in stored.keys():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint key {key!r} is not a string")
        if key.startswith("@"):
            name, _, name_scalar = key[1:].rpartition("/")
            entry = optimizers.get(name)
            if entry is None:
                raise CheckpointError(
                    f"checkpoint tensor {key!r} belongs to no optimizer of the metadata ({sorted(optimizers)})"
                )
            if name_scalar not in ("step", "learning_rate", *entry.get("scheduled", []), *entry.get("running", [])):
                raise CheckpointError(
                    f"checkpoint tensor {key!r}: {entry['type']} {name!r} has no state scalar {name_scalar!r}"
                )
            scalar(stored, key, integer=name_scalar == "step")
            kinds[key] = "scalar"
        elif key.startswith("#"):
            name = key[1:]
            if name in WHOLE_MODEL_ARRAYS:
                scalar(stored, key, integer=False, finite=False)  # the norm of a skipped step is not
                kinds[key] = "whole-model"
            elif name.startswith("accumulated/") and name[len("accumulated/") :] in parameters:
                _float_array(stored, key)
                kinds[key] = "accumulated"
            elif name.startswith("carried/") and name[len("carried/") :].rpartition("/")[0] in rerouted:
                _float_array(stored, key)
                kinds[key] = "carried"
            else:
                raise CheckpointError(
                    f"checkpoint tensor {key!r} is not whole-model state this treeopt knows (#grad_norm, "
                    "#accumulated/<a parameter of the metadata>, #carried/<a rerouted parameter>/<slot>)"
                )
        else:
            path, slot = split_slot_key(key)
            spec = parameters.get(path, {}).get("slots", {}).get(slot)
            if spec is None:
                raise CheckpointError(f"checkpoint tensor {key!r} is not listed in the metadata's parameters")
            shape, dtype = _spec(stored, key)
            if shape != spec["shape"] or dtype != spec["dtype"]:
                raise CheckpointError(
                    f"checkpoint tensor {key!r} is stored as {dtype}{shape}, the metadata says "
                    f"{spec['dtype']}{spec['shape']}"
                )
            kinds[key] = "slot"
    for path, info in parameters.items():
        for slot in info["slots"]:
            if slot_key(path, slot) not in kinds:
                raise CheckpointError(f"checkpoint tensor {slot_key(path, slot)!r} is in the metadata but not stored")
    if "step" in meta:
        first = next(iter(optimizers), None)
        key = f"@{first}/step"
        if first is not None and key in kinds and int(_value(stored, key)) != meta["step"]:
            raise CheckpointError(
                f"checkpoint tensor {key!r} is {int(_value(stored, key))} but the metadata's 'step' is {meta['step']}"
            )
    return kinds


def _float_array(stored, key):
    shape, dtype = _spec(stored, key)
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"checkpoint tensor {key!r} is {dtype}; state arrays are one of {FLOAT_DTYPES}")
    return shape, dtype
