"""Checkpoint files: safetensors with treeopt's metadata, written atomically, checksummed.

A write goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed
over the destination (and the folder fsync'ed): a crash at any moment leaves the old file or
the new one, never a torn one. The metadata carries a CRC-32 (as zip and PNG do) of every
key, dtype, shape and byte of data, and of the metadata itself, so a truncated or corrupted
file is an error, never garbage state. Nothing on the load path executes code (no pickle).

Reading copies the file into memory first (on Linux an anonymous in-memory file, read one
tensor at a time, so a load holds the file and one tensor besides the state; elsewhere the
file's bytes, parsed whole). The checksum is verified on that copy and the loader copies
from it, so what is checked is what is loaded: a file truncated or rewritten on disk during
the load (``cp`` over it) cannot tear the load or, through a memory map, kill the process.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from treeopt.backends import array_backend
from treeopt.checkpoint.format import CheckpointError
from treeopt.types import Array, Scalar

if TYPE_CHECKING:
    from types import ModuleType

METADATA_KEY = "treeopt"


def as_numpy(value: Scalar) -> np.ndarray:
    """An array as NumPy (zero-copy for NumPy and CPU torch), contiguous."""
    backend = array_backend(value)
    array = np.asarray(value) if backend.name == "python" else np.asarray(backend.to_numpy(value))
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)  # (keeps 0-d arrays 0-d)


def _feed(crc, key, array):
    crc = zlib.crc32(f"{key}|{array.dtype.name}|{list(array.shape)}|".encode(), crc)
    # as bytes: ml_dtypes' bfloat16 has no buffer format of its own
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data, crc)


def _finish(crc, metadata):
    body = {k: v for k, v in metadata.items() if k != "checksum"}
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode(), crc):08x}"


def checksum(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> str:
    """The checksum of ``arrays`` (by key, in sorted order) and ``metadata``."""
    crc = 0
    for key in sorted(arrays):
        crc = _feed(crc, key, arrays[key])
    return _finish(crc, metadata)


def safetensors() -> ModuleType:
    """The ``safetensors`` package, or an ImportError that says how to install it."""
    try:
        import safetensors.numpy
    except ImportError as error:
        raise ModuleNotFoundError(
            "treeopt checkpoints are safetensors files and the safetensors package is not installed: "
            "pip install 'treeopt[checkpoint]' (or pip install safetensors)",
            name="safetensors",
        ) from error
    return safetensors


def _umask():
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(mask)
    return mask


def write(path: str | os.PathLike[str], tensors: Mapping[str, Array], metadata: dict[str, Any]) -> None:
    """Write ``tensors`` (any library) and ``metadata`` (JSON-able) to ``path`` atomically."""
    arrays = {key: as_numpy(value) for key, value in tensors.items()}
    metadata = dict(metadata, checksum={"algorithm": "crc32", "value": checksum(arrays, metadata)})
    save_file = safetensors().numpy.save_file
    replace_atomically(
        path, lambda temporary: save_file(arrays, temporary, metadata={METADATA_KEY: json.dumps(metadata)})
    )


def replace_atomically(path: str | os.PathLike[str], write_to: Callable[[str], object]) -> None:
    """Call ``write_to(temporary)`` for a temporary file beside ``path``, flush it to disk and
    rename it over ``path``: readers see the old file or the new one, never a torn one. The
    file gets the permissions any new file gets (``0666`` less the umask), as ``open`` gives."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        write_to(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it 0600: private even on a shared cluster
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


_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


class Tensors:
    """The tensors of an open checkpoint, read one at a time: ``tensors[key]`` reads it,
    ``spec(key)`` gives ``(shape, dtype)`` from the header without reading."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._keys = list(handle.keys())

    def keys(self) -> list[str]:
        return list(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def get(self, key: str, default: np.ndarray | None = None) -> np.ndarray | None:
        return self[key] if key in self._keys else default

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        return ((key, self[key]) for key in self._keys)

    def values(self) -> Iterator[np.ndarray]:
        return (self[key] for key in self._keys)

    def spec(self, key: str) -> tuple[list[int], str]:
        view = self._handle.get_slice(key)
        return list(view.get_shape()), _DTYPES.get(view.get_dtype(), view.get_dtype().lower())


class _Parsed:
    """The part of ``safe_open``'s handle that :class:`Tensors` uses, over a file's bytes
    (where no in-memory file can be made)."""

    def __init__(self, data: bytes) -> None:
        import numpy as np

        self._arrays: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, str] = {}
        for key, info in safetensors().deserialize(data):  # checks the header and the offsets
            dtype = _DTYPES.get(info["dtype"], info["dtype"].lower())
            if dtype == "bfloat16":
                import ml_dtypes  # noqa: F401  # registers NumPy's bfloat16
            self._arrays[key] = np.frombuffer(info["data"], dtype=dtype).reshape(info["shape"])
            self._dtypes[key] = info["dtype"]
        size = int.from_bytes(data[:8], "little")
        self._metadata = json.loads(bytes(data[8 : 8 + size])).get("__metadata__")

    def keys(self) -> list[str]:
        return list(self._arrays)

    def metadata(self) -> dict[str, str] | None:
        return self._metadata

    def get_tensor(self, key: str) -> Any:
        return self._arrays[key]

    def get_slice(self, key: str) -> Any:
        array, dtype = self._arrays[key], self._dtypes[key]

        class View:
            def get_shape(self) -> list[int]:
                return list(array.shape)

            def get_dtype(self) -> str:
                return dtype

        return View()


def _open_copy(path: str) -> Any:
    """A safetensors handle over a copy of the file in memory, taken with plain reads (no
    memory map of the file itself): an anonymous in-memory file where the system has them,
    else the bytes."""
    with open(path, "rb") as source:
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            copy = os.memfd_create("treeopt-checkpoint", os.MFD_CLOEXEC)
            try:
                while os.sendfile(copy, source.fileno(), None, 1 << 30):  # until the end of the file
                    pass
                copied = True
            except OSError:  # a file system sendfile cannot read: the bytes instead
                source.seek(0)
                copied = False
            try:
                if copied:
                    return safetensors().safe_open(f"/proc/self/fd/{copy}", framework="numpy")  # maps the copy
            finally:
                os.close(copy)  # the handle keeps the copy while it lives
        return _Parsed(source.read())


def read(path: str | os.PathLike[str]) -> tuple[Tensors, dict[str, Any] | None]:
    """``(tensors, metadata)`` of a safetensors file, its checksum verified when it has
    treeopt metadata (``metadata`` is ``None`` for a plain safetensors file). ``tensors`` is a
    :class:`Tensors`, read from a copy of the file in memory (see the module's notes)."""
    path = os.fspath(path)
    safetensors()  # installed, or say how to install it
    try:
        handle = _open_copy(path)
        header = handle.metadata() or {}
        tensors = Tensors(handle)
        if METADATA_KEY not in header:
            return tensors, None
        try:
            metadata = json.loads(header[METADATA_KEY])
            expected = metadata["checksum"]["value"] if isinstance(metadata, dict) else None
            if not isinstance(expected, str):
                raise KeyError("no checksum")
            crc = _finish(0, metadata)  # serialises it again: too deep a nesting fails here or in loads
        except (ValueError, KeyError, TypeError, IndexError, RecursionError) as error:
            detail = "nested too deeply" if isinstance(error, RecursionError) else f"{type(error).__name__}: {error}"
            raise CheckpointError(f"{path}: the treeopt metadata is corrupted ({detail})") from error
        crc = 0
        for key in sorted(tensors.keys()):  # one tensor in memory at a time
            crc = _feed(crc, key, tensors[key])
    except (FileNotFoundError, CheckpointError, IsADirectoryError, PermissionError):
        raise
    except Exception as error:  # safetensors, OS and format errors of a damaged file
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {error}"
        ) from error
    if _finish(crc, metadata) != expected:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupted")
    return tensors, metadata
