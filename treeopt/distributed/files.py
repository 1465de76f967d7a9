"""``treeopt.checkpoint.save/load`` on several ranks: a folder, loadable at any world size.

    checkpoint.save(opt, "ckpt/")   # every rank calls it (opt: a treeopt.torch.Optimizer)
    checkpoint.load(opt, "ckpt/")   # at the same or another world size

The folder holds one safetensors file per rank, written by ``torch.distributed.checkpoint``'s
``HuggingFaceStorageWriter(save_distributed=True)`` (each file records the global offsets of
what it holds), and ``treeopt.json``: the global metadata, the same on every rank. Nothing is
pickled, on save or on load. Loading asks DCP for the regions this rank's current layout
holds, then checks everything by name as a single-file load does.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Protocol

import numpy as np

from treeopt.checkpoint.base import CheckpointError, LoadReport

METADATA = "treeopt.json"


class Adapter(Protocol):
    """What a folder is saved from and loaded into: a ``treeopt.torch.Optimizer``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> LoadReport: ...


def save(adapter: Adapter, folder: str | os.PathLike[str]) -> None:
    # torch only when a folder is written or read: checkpoints import this module without it
    import torch.distributed as dist
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save as dcp_save

    state = adapter.state_dict()  # a collective: every rank calls save
    os.makedirs(folder, exist_ok=True)
    dcp_save(state["tensors"], storage_writer=HuggingFaceStorageWriter(os.fspath(folder), save_distributed=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        metadata = json.loads(state["metadata"])
        metadata["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
        temporary = os.path.join(folder, METADATA + ".tmp")
        with open(temporary, "w") as file:
            json.dump(metadata, file, indent=1, sort_keys=True)
        os.replace(temporary, os.path.join(folder, METADATA))  # last: a folder with it is complete
    if dist.is_initialized():
        dist.barrier()


def load(adapter: Adapter, folder: str | os.PathLike[str], strict: bool = True) -> LoadReport:
    # torch only when a folder is written or read: checkpoints import this module without it
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load as dcp_load

    if not callable(getattr(adapter, "load_state_dict", None)):
        raise CheckpointError(f"{folder} is a checkpoint of several ranks: load it into a treeopt.torch.Optimizer")
    path = os.path.join(folder, METADATA)
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no {METADATA}: not a complete treeopt checkpoint folder")
    with open(path) as file:
        metadata = json.load(file)
    metadata.pop("world_size", None)
    reader = HuggingFaceStorageReader(os.fspath(folder))
    stored = set(reader.read_metadata().state_dict_metadata)
    # into copies of this rank's slots (resharded by DCP), so a checkpoint that does not fit
    # changes nothing: load_state_dict checks everything before it writes
    tensors = {k: v.clone() for k, v in adapter.state_dict()["tensors"].items() if k in stored}
    dcp_load(tensors, storage_reader=reader)
    return adapter.load_state_dict({"tensors": tensors, "metadata": metadata}, strict=strict)


def is_folder_checkpoint(path: str | os.PathLike[str]) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, METADATA))


def inspect(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """``(summary, problems)`` of a checkpoint folder: every slot of the metadata must be
    stored, and its row ranges over all the files must cover its rows exactly once."""
    # optional: treeopt[checkpoint]
    from safetensors import safe_open

    with open(os.path.join(folder, METADATA)) as file:
        metadata = json.load(file)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    pieces: dict[str, list[tuple[list[int], list[int]]]] = {}  # key -> [(offsets, shape)]
    for name in files:
        with safe_open(os.path.join(folder, name), framework="numpy") as handle:
            info = json.loads((handle.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
            for key in handle.keys():
                shape = list(handle.get_slice(key).get_shape())
                offsets = info.get(key, {}).get("saved_offsets", [0] * len(shape))
                pieces.setdefault(key, []).append((offsets, shape))
    problems = []
    groups = {
        o["name"]: {
            "type": o["type"],
            "parameters": 0,
            "elements": 0,
            "bytes": 0,
            "learning_rate": None,
            "hyperparameters": o["hyperparameters"],
        }
        for o in metadata["optimizers"]
    }
    for path_, entry in metadata["parameters"].items():
        group = groups.get(entry["owner"])
        if group is not None:
            group["parameters"] += 1
            shapes = [spec["shape"] for spec in entry["slots"].values()]
            group["elements"] += math.prod(max(shapes, key=math.prod)) if shapes else 0
            group["bytes"] += sum(
                math.prod(spec["shape"]) * _itemsize(spec["dtype"]) for spec in entry["slots"].values()
            )
        for slot, spec in entry["slots"].items():
            key = f"{path_}/{slot}"
            if key not in pieces:
                problems.append(f"{key}: in the metadata but in no file")
                continue
            rows = spec["shape"][0] if spec["shape"] else 1
            covered = sorted((o[0] if o else 0, (o[0] if o else 0) + (s[0] if s else 1)) for o, s in pieces[key])
            position = 0
            for start, stop in covered:
                if start != position:
                    problems.append(f"{key}: rows {position}..{start} missing or stored twice")
                position = max(position, stop)
            if position != rows:
                problems.append(f"{key}: rows cover {position} of {rows}")
    summary = {
        "folder": str(folder),
        "files": len(files),
        "saved_world_size": metadata.get("world_size"),
        "step": metadata.get("step"),
        "groups": groups,
        "tensors": len(pieces),
    }
    return summary, problems


def _itemsize(dtype):

    return 2 if dtype in ("float16", "bfloat16") else np.dtype(dtype).itemsize
