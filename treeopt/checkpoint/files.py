"""Checkpoint files: safetensors with treeopt's metadata, written atomically, checksummed.

A write goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed
over the destination (and the folder fsync'ed): a crash at any moment leaves the old file or
the new one, never a torn one. The metadata carries a SHA-256 of every key, dtype, shape and
byte of data, and of the metadata itself, so a truncated or corrupted file is an error, never
garbage state. Nothing on the load path executes code (no pickle).
"""

import hashlib
import json
import os
import tempfile

import numpy as np

from treeopt.backends import backend_of
from treeopt.checkpoint.format import CheckpointError

METADATA_KEY = "treeopt"


def as_numpy(value):
    """An array as NumPy (zero-copy for NumPy and CPU torch), contiguous."""
    backend = backend_of(value)
    array = np.asarray(value) if backend.name == "python" else np.asarray(backend.to_numpy(value))
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)  # (keeps 0-d arrays 0-d)


def checksum(arrays, metadata):
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = arrays[key]
        digest.update(f"{key}|{array.dtype.name}|{list(array.shape)}|".encode())
        # as bytes: ml_dtypes' bfloat16 has no buffer format of its own
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    body = {k: v for k, v in metadata.items() if k != "checksum"}
    digest.update(json.dumps(body, sort_keys=True).encode())
    return digest.hexdigest()


def write(path, tensors, metadata):
    """Write ``tensors`` (any library) and ``metadata`` (JSON-able) to ``path`` atomically."""
    from safetensors.numpy import save_file

    arrays = {key: as_numpy(value) for key, value in tensors.items()}
    metadata = dict(metadata, checksum={"algorithm": "sha256", "value": checksum(arrays, metadata)})
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        save_file(arrays, temporary, metadata={METADATA_KEY: json.dumps(metadata)})
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def read(path):
    """``(arrays, metadata)`` of a safetensors file, checked against its checksum when it has
    treeopt metadata (``metadata`` is ``None`` for a plain safetensors file)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as handle:
            header = handle.metadata() or {}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {error}") from error
    if METADATA_KEY not in header:
        return arrays, None
    try:
        metadata = json.loads(header[METADATA_KEY])
        expected = metadata["checksum"]["value"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: the treeopt metadata is corrupted ({error})") from error
    if checksum(arrays, metadata) != expected:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupted")
    return arrays, metadata
