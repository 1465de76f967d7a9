"""State dicts that ``torch.distributed.checkpoint`` saves at one world size and loads at another.

The layout is treeopt's checkpoint layout (``"{path}/{slot}"``, ``"@{optimizer}/{scalar}"``,
plus JSON-able metadata) with ranks in mind:

- a slot of a parameter one rank owns whole is a plain tensor, present on that rank only;
- a slot of a row-split parameter is a ``DTensor`` with ``Shard(0)`` placement on a 1-D mesh
  of the process group, so DCP knows which global rows each rank holds;
- scalars and the metadata are the same on every rank. The metadata describes the global
  state (every parameter, global shapes) and is checked to hash alike on every rank: DCP
  keeps one rank's copy of a replicated value, silently, whichever it is.

Resharding is DCP's: the load target is this process's current layout, and DCP reads the
saved regions each target needs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from treeopt.checkpoint.base import CheckpointError, split_slot_key

if TYPE_CHECKING:
    from treeopt.distributed.comm import Collectives

T = TypeVar("T")

__all__ = ["agreed", "fingerprint", "encode", "decode", "dcp_errors"]


def encode(metadata: dict[str, Any]) -> str:
    """The metadata as one JSON string: DCP stores a string as one value, whereas it would
    flatten a dict and load back only the entries the *current* metadata happens to have."""
    return json.dumps(metadata, sort_keys=True)


def decode(metadata: str | bytes | dict[str, Any]) -> dict[str, Any]:
    """The metadata dict of :func:`encode`'s string (a dict passes through)."""
    return json.loads(metadata) if isinstance(metadata, (str, bytes)) else metadata


def fingerprint(value: object) -> str:
    """A hash of a JSON-able value (dict keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def agreed(comm: Collectives, what: str, value: T) -> T:
    """Raise unless ``value`` is the same on every rank of ``comm`` (compared by hash)."""
    mine = fingerprint(value)
    seen = comm.all_gather_object(mine)
    differing = [rank for rank, theirs in enumerate(seen) if theirs != mine]
    if differing:
        raise RuntimeError(
            f"treeopt: ranks disagree on the {what}: rank {comm.rank} differs from rank(s) {differing}. "
            "Every rank must build the same model, routes and optimizer, and take the same steps"
        )
    return value


@contextmanager
def dcp_errors(where: str, what: str) -> Iterator[None]:
    """Raise what ``torch.distributed.checkpoint`` raises as a :class:`CheckpointError`
    naming ``where``, the rank and the key: DCP's ``CheckpointException`` derives from
    ``BaseException`` (``except Exception`` misses it) and its message is a traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointError:
        raise
    except (CheckpointException, Exception) as error:
        failures = error.failures if isinstance(error, CheckpointException) else {None: (error, None)}
        parts = []
        for rank, failure in failures.items():
            cause = failure[0] if isinstance(failure, tuple) else failure
            text = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
            key = re.search(r"fqn='([^']*)'|for (\S+?)\.?$|key '([^']*)'|'([^']*/[^']*)'", text)
            named = f" (key {next(k for k in key.groups() if k)!r})" if key else ""
            parts.append(f"{'' if rank is None else f'rank {rank}: '}{type(cause).__name__}{named}: {text[:300]}")
        raise CheckpointError(f"{where}: torch.distributed.checkpoint could not {what}: " + "; ".join(parts)) from error


def split_key(key: str) -> tuple[str, str | None] | None:
    """``(parameter path, slot)`` of a ``"{path}/{slot}"`` key, ``(path, None)`` for an
    accumulation buffer ``"#accumulated/{path}"``, ``None`` for anything else."""
    if key.startswith("#accumulated/"):
        return key[len("#accumulated/") :], None
    if key.startswith(("@", "#")) or "/" not in key:
        return None
    return split_slot_key(key)


def global_metadata(comm: Collectives, local_metadata: dict[str, Any], split_rows: Mapping[str, int]) -> dict[str, Any]:
    """One metadata for every rank: the parameters' entries come from the ranks that own them
    (global shapes for the row-split ones: ``split_rows`` maps their names to their rows);
    everything else must already agree."""
    gathered = comm.all_gather_object(local_metadata)
    common = [{k: v for k, v in m.items() if k != "parameters"} for m in gathered]
    for rank, other in enumerate(common):
        if fingerprint(other) != fingerprint(common[0]):
            differs = sorted(k for k in set(other) | set(common[0]) if other.get(k) != common[0].get(k))
            raise RuntimeError(
                f"treeopt: rank {rank} and rank 0 disagree on the checkpoint's {differs}: "
                "every rank must take the same steps with the same optimizer"
            )
    merged = dict(common[0])
    parameters = {}
    for name in gathered[0]["parameters"]:
        entries = [m["parameters"].get(name) for m in gathered]
        with_slots = [e for e in entries if e and e["slots"]]
        chosen = dict(with_slots[0] if with_slots else entries[0])
        if name in split_rows:
            chosen["slots"] = {
                s: dict(spec, shape=[split_rows[name]] + spec["shape"][1:]) for s, spec in chosen["slots"].items()
            }
        parameters[name] = chosen
    merged["parameters"] = parameters
    return merged


def local_metadata(metadata: dict[str, Any], rows: Mapping[str, tuple[int, int] | None] | None) -> dict[str, Any]:
    """The part of a global metadata that one rank loads: ``rows`` maps each parameter it
    updates to its ``(start, stop)`` rows, ``None`` for whole ones; other parameters are left
    out (``rows=None``: keep every parameter whole)."""
    if rows is None:
        return metadata
    parameters = {}
    for name, entry in metadata["parameters"].items():
        if name not in rows:
            continue
        span = rows[name]
        if span is not None:
            start, stop = span
            entry = dict(
                entry,
                slots={s: dict(spec, shape=[stop - start] + spec["shape"][1:]) for s, spec in entry["slots"].items()},
            )
        parameters[name] = entry
    return dict(metadata, parameters=parameters)


def local_tensors(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors of a state dict as this rank holds them: a ``DTensor`` (what DCP loaded
    into a sharded target) becomes its local shard, anything else stays as it is."""
    return {k: v.to_local() if hasattr(v, "to_local") else v for k, v in tensors.items()}
