"""The text the demo's transformer learns: the source of Python's standard library, as bytes.

The archive ``data/stdlib.txt.gz`` holds the top-level modules of CPython 3.11's ``Lib/``
(PSF licence, ``data/PYTHON-LICENSE.txt``), one after the other; :func:`build` wrote it
(see ``data/README.md``). Whole modules are held out for validation, so the validation
loss measures code the model has not seen.
"""

from __future__ import annotations

import gzip
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import os

DATA = pathlib.Path(__file__).parent / "data"
ARCHIVE = DATA / "stdlib.txt.gz"
#: the line that starts every module in the archive; the name follows it
SEPARATOR = b"\n# ===== module: "
#: every this-many-th module (sorted by name) goes to the validation text
VALIDATION_EVERY = 12


def build(
    stdlib: str | os.PathLike[str], out: str | os.PathLike[str] = ARCHIVE, exclude: Sequence[str] = ("_sysconfigdata",)
) -> int:
    """Write the archive from the ``*.py`` files directly inside ``stdlib`` (a ``Lib/``
    folder), sorted by name, skipping names that start with one of ``exclude`` (generated,
    machine-specific files). Returns the number of modules written."""
    files = sorted(p for p in pathlib.Path(stdlib).glob("*.py") if not p.name.startswith(tuple(exclude)))
    # no file name and mtime=0 in the gzip header: the same sources give the same bytes
    with open(out, "wb") as raw, gzip.GzipFile("", "wb", compresslevel=9, fileobj=raw, mtime=0) as archive:
        for path in files:
            archive.write(SEPARATOR + path.name.encode() + b"\n" + path.read_bytes())
    return len(files)


def load_modules(archive: str | os.PathLike[str] = ARCHIVE) -> dict[str, bytes]:
    """``{module file name: its source as bytes}``, in the archive's order."""
    chunks = gzip.decompress(pathlib.Path(archive).read_bytes()).split(SEPARATOR)[1:]
    modules = {}
    for chunk in chunks:
        name, _, source = chunk.partition(b"\n")
        modules[name.decode()] = source
    return modules


def train_validation(archive: str | os.PathLike[str] = ARCHIVE) -> tuple[np.ndarray, np.ndarray]:
    """The training and validation texts as uint8 arrays: every ``VALIDATION_EVERY``-th
    module goes to validation, the rest to training."""
    modules = list(load_modules(archive).values())
    validation = [m for i, m in enumerate(modules) if i % VALIDATION_EVERY == VALIDATION_EVERY // 2]
    training = [m for i, m in enumerate(modules) if i % VALIDATION_EVERY != VALIDATION_EVERY // 2]
    return (np.frombuffer(b"".join(training), np.uint8), np.frombuffer(b"".join(validation), np.uint8))


def batch_starts(size: int, context: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """The start of every training sequence, ``(steps, batch_size)``: drawn at random, from
    ``seed`` only, so runs with the same seed see the same batches whatever their optimizer."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, size - context - 1, size=(steps, batch_size))


def validation_starts(size: int, context: int, count: int) -> np.ndarray:
    """``count`` evenly spaced, non-overlapping sequence starts in a text of ``size`` bytes
    (the same for every run and seed)."""
    stride = (size - context - 1) // count
    if stride < context:
        raise ValueError(f"the validation text ({size} bytes) is too short for {count} sequences of {context}")
    return np.arange(count) * stride
