"""``treeopt.checkpoint.save/load`` on several ranks: a folder, loadable at any world size.

    checkpoint.save(opt, "ckpt/")   # every rank calls it (opt: a treeopt.torch.Optimizer)
    checkpoint.load(opt, "ckpt/")   # at the same or another world size

The folder holds the manifest and one version of the checkpoint::

    ckpt/treeopt.json                          the global metadata, the version in use, and
                                               each of its files' size and SHA-256
    ckpt/step-00000004-<save id>/*.safetensors one file per rank

Every rank writes its file into a new version folder, named after the step and an id drawn
for this save, with ``torch.distributed.checkpoint``'s ``HuggingFaceStorageWriter`` (each
file records the global offsets of what it holds); the files are hashed (each rank hashes
some of them), and rank 0 writes the manifest to a temporary file, flushes it and renames it
over ``treeopt.json``: that rename is the commit. Older versions are removed after it. A
process killed at any moment leaves the last committed checkpoint whole.

Loading reads the manifest, checks that every file it lists has its size and hash (a file of
another save, a flipped bit, a truncated or missing file is a :class:`CheckpointError` that
names it, raised on every rank), reads those files only (anything else in the folder is
ignored), asks DCP for the regions this rank's current layout holds, then checks everything
by name as a single-file load does. DCP's own errors become ``CheckpointError``\\ s that name
the key. Nothing is pickled, on save or on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from typing import TYPE_CHECKING, Any

from treeopt.checkpoint.base import CheckpointError, slot_key
from treeopt.checkpoint.files import replace_atomically
from treeopt.distributed.state import dcp_errors, decode
from treeopt.optimizer import step_lock

if TYPE_CHECKING:
    from treeopt.checkpoint.format import LoadReport
    from treeopt.distributed.comm import Collectives
    from treeopt.torch.optimizer import Optimizer as TorchOptimizer

METADATA = "treeopt.json"
_VERSION = re.compile(r"step-(\d{8,})-([0-9a-f]{16})")
_FILE = re.compile(r"[\w][\w.-]*\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def save(adapter: TorchOptimizer, folder: str | os.PathLike[str]) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save as dcp_save

    folder, comm = os.fspath(folder), _comm(adapter)
    rank, world = (comm.rank, comm.world) if comm is not None else (0, 1)
    with step_lock(adapter.optimizer):  # a step in another thread waits: the files hold one step's state
        state = adapter.state_dict()  # a collective: every rank calls save
        metadata = decode(state["metadata"])
        save_id = _gather(comm, uuid.uuid4().hex[:16])[0]  # rank 0's
        version = f"step-{metadata['step']:08d}-{save_id}"
        target = os.path.join(folder, version)
        os.makedirs(target, exist_ok=True)
        writer = HuggingFaceStorageWriter(target, save_distributed=True)
        with dcp_errors(folder, "save"):
            dcp_save(state["tensors"], storage_writer=writer, process_group=None if comm is None else comm.group)
    _gather(comm, None)  # every file written
    names = sorted(f for f in os.listdir(target) if f.endswith(".safetensors"))
    hashes: dict[str, Any] = {}
    for part in _gather(comm, {n: _describe(os.path.join(target, n)) for n in names[rank::world]}):
        hashes.update(part)
    if rank == 0:
        _sync(target)
        manifest = dict(
            metadata,
            world_size=world,
            save={"id": save_id, "step": metadata["step"], "folder": version, "files": hashes},
        )
        text = json.dumps(manifest, indent=1, sort_keys=True)
        replace_atomically(os.path.join(folder, METADATA), lambda temporary: _write_text(temporary, text))
        for name in os.listdir(folder):  # after the commit: versions nothing points to
            if _VERSION.fullmatch(name) and name != version:
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    _gather(comm, None)  # committed before any rank returns


def load(adapter: TorchOptimizer, folder: str | os.PathLike[str], strict: bool = True) -> LoadReport:
    import torch
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not hasattr(adapter, "_trainable"):
        raise CheckpointError(f"{folder} is a checkpoint of several ranks: load it into a treeopt.torch.Optimizer")
    folder, comm = os.fspath(folder), _comm(adapter)
    manifest = read_manifest(folder)
    source, names = _source(folder, manifest)
    rank, world = (comm.rank, comm.world) if comm is not None else (0, 1)
    problems = [p for part in _gather(comm, _verify(source, manifest, names[rank::world])) for p in part]
    if problems:  # on every rank: none goes on to DCP's collectives alone
        raise CheckpointError(f"{folder}: the checkpoint's files are not the ones it lists: " + "; ".join(problems))
    reader = HuggingFaceStorageReader(source)
    reader.fs = _Listed(reader.fs, names)  # type: ignore[assignment]  # a file that is not listed is never read
    metadata = {k: v for k, v in manifest.items() if k not in ("world_size", "save")}
    with dcp_errors(folder, "load"):
        stored = reader.read_metadata().state_dict_metadata
    # into copies of this rank's slots (resharded by DCP), so a checkpoint that does not fit
    # changes nothing: load_state_dict checks everything before it writes
    tensors = {k: v.clone() for k, v in adapter.state_dict()["tensors"].items() if k in stored}
    if adapter._distributed is None:  # one process, whole tensors: also those it has no state for yet
        for key, saved in stored.items():
            if key not in tensors and isinstance(saved, TensorStorageMetadata):
                tensors[key] = torch.empty(saved.size, dtype=saved.properties.dtype)
    with dcp_errors(folder, "load"):
        dcp_load(tensors, storage_reader=reader, process_group=None if comm is None else comm.group)
    return adapter.load_state_dict({"tensors": tensors, "metadata": metadata}, strict=strict)


def is_folder_checkpoint(path: str | os.PathLike[str]) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, METADATA))


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a checkpoint folder, its ``save`` entry checked (a manifest without
    one, written before folders had checksums, lists no files)."""
    path = os.path.join(folder, METADATA)
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no {METADATA}: not a complete treeopt checkpoint folder")
    try:
        with open(path) as file:
            manifest = json.load(file)
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({type(error).__name__}: {error})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    save = manifest.get("save")
    if save is None:
        return manifest

    def fail(message: str) -> None:
        raise CheckpointError(f"{path}: 'save' {message}")

    if not isinstance(save, dict) or set(save) != {"id", "step", "folder", "files"}:
        fail("must have exactly 'id', 'step', 'folder' and 'files'")
    step, version, listed = save["step"], save["folder"], save["files"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(save["id"], str):
        fail(f"step must be an integer >= 0 and id a string, got {step!r} and {save['id']!r}")
    if not isinstance(version, str) or version != f"step-{step:08d}-{save['id']}" or not _VERSION.fullmatch(version):
        fail(f"folder {version!r} is not the step-<step>-<id> of its step {step!r} and id {save['id']!r}")
    if step != manifest.get("step"):
        fail(f"step {step} is not the metadata's step {manifest.get('step')!r}")
    if not isinstance(listed, dict) or not listed:
        fail("files must name the checkpoint's files")
    for name, entry in listed.items():
        if not _FILE.fullmatch(name):
            fail(f"files: {name!r} is not the name of a .safetensors file in the folder")
        if (
            not isinstance(entry, dict)
            or set(entry) != {"bytes", "sha256"}
            or not isinstance(entry["bytes"], int)
            or not isinstance(entry["sha256"], str)
            or not _SHA256.fullmatch(entry["sha256"])
        ):
            fail(f"files: {name!r} must have 'bytes' (an integer) and 'sha256' (64 hex digits)")
    return manifest


def inspect(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """``(summary, problems)`` of a checkpoint folder: every listed file must have its size
    and hash, every slot of the metadata must be stored, and its row ranges over all the files
    must cover its rows exactly once."""
    from safetensors import safe_open

    manifest = read_manifest(folder)
    source, files = _source(os.fspath(folder), manifest)
    problems = _verify(source, manifest, files)
    pieces: dict[str, list[tuple[list[int], list[int]]]] = {}  # key -> [(offsets, shape)]
    for name in files:
        if not os.path.exists(os.path.join(source, name)) or problems:
            continue  # read only files that are what the manifest says
        with safe_open(os.path.join(source, name), framework="numpy") as handle:
            info = json.loads((handle.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
            for key in handle.keys():
                shape = list(handle.get_slice(key).get_shape())
                offsets = info.get(key, {}).get("saved_offsets", [0] * len(shape))
                pieces.setdefault(key, []).append((offsets, shape))
    groups = {
        o["name"]: {
            "type": o["type"],
            "parameters": 0,
            "elements": 0,
            "bytes": 0,
            "learning_rate": None,
            "hyperparameters": o["hyperparameters"],
        }
        for o in manifest["optimizers"]
    }
    for path_, entry in manifest["parameters"].items():
        group = groups.get(entry["owner"])
        if group is not None:
            group["parameters"] += 1
            shapes = [spec["shape"] for spec in entry["slots"].values()]
            group["elements"] += math.prod(max(shapes, key=math.prod)) if shapes else 0
            group["bytes"] += sum(
                math.prod(spec["shape"]) * _itemsize(spec["dtype"]) for spec in entry["slots"].values()
            )
        for slot, spec in entry["slots"].items():
            key = slot_key(path_, slot)
            if problems:
                break
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
        "saved_world_size": manifest.get("world_size"),
        "step": manifest.get("step"),
        "groups": groups,
        "tensors": len(pieces),
    }
    return summary, problems


def _source(folder: str, manifest: dict[str, Any]) -> tuple[str, list[str]]:
    """The folder that holds the checkpoint's files, and their names."""
    save = manifest.get("save")
    if save is None:  # written before folders had a manifest of files: every file in it
        return folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    return os.path.join(folder, save["folder"]), sorted(save["files"])


def _verify(source: str, manifest: dict[str, Any], names: list[str]) -> list[str]:
    """What is wrong with the files ``names`` of ``source``: missing, of another size or
    another hash than the manifest says (nothing to check without a list of files)."""
    listed = (manifest.get("save") or {}).get("files")
    if listed is None:
        return []
    problems = []
    for name in names:
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is listed in the manifest but missing")
            continue
        found = _describe(path)
        if found["bytes"] != listed[name]["bytes"]:
            problems.append(
                f"{name} has {found['bytes']} bytes, the manifest says {listed[name]['bytes']} (truncated, or a file "
                "of another save)"
            )
        elif found["sha256"] != listed[name]["sha256"]:
            problems.append(f"{name}: its SHA-256 is not the manifest's (damaged, or a file of another save)")
    return problems


def _describe(path: str) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


class _Listed:
    """DCP's file system, listing only the named files (so DCP's reader, which reads every
    ``.safetensors`` file of its folder, reads the manifest's files and no stray)."""

    def __init__(self, fs: Any, names: list[str]) -> None:
        self._fs, self._names = fs, set(names)

    def ls(self, path: Any) -> list[str]:
        return [p for p in self._fs.ls(path) if os.path.basename(p) in self._names]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


def _comm(adapter: TorchOptimizer) -> Collectives | None:
    """The ranks saving or loading together (``None``: this process alone)."""
    return getattr(adapter._distributed, "comm", None)


def _gather(comm: Collectives | None, value: Any) -> list[Any]:
    return [value] if comm is None else comm.all_gather_object(value)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _sync(folder: str) -> None:
    """Flush a folder's entries (the files' names) to disk."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _itemsize(dtype):
    import numpy as np

    return 2 if dtype in ("float16", "bfloat16") else np.dtype(dtype).itemsize
