"""Inspect a checkpoint from the command line.

    python -m treeopt.checkpoint info FILE_OR_FOLDER [--json]

Prints the step, each optimizer (group) with its parameter count, elements, state bytes and
hyper-parameters, and every problem found: a checksum mismatch, a truncated file, tensors
missing or not matching the metadata. Exits with status 1 when there is a problem.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from treeopt import _text
from treeopt.checkpoint import files, mlx_layout, validate
from treeopt.checkpoint.base import slot_key
from treeopt.checkpoint.format import CheckpointError


def inspect(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """``(summary dict, problems list)`` of a checkpoint file, or of a folder saved by
    several ranks (every slot must be stored and its rows covered exactly once)."""
    # only for folders of several ranks, which sit above the checkpoints
    from treeopt.distributed import files as folders

    if folders.is_folder_checkpoint(path):
        return folders.inspect(path)
    why = not_a_checkpoint(path)
    if why is not None:
        return {"file": str(path)}, [why]
    problems = []
    try:
        arrays, metadata = files.read(path)
    except CheckpointError as error:
        return {"file": str(path)}, [str(error)]
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        return {"file": str(path)}, [f"cannot read {path}: {error.strerror or error}"]
    if metadata is None:
        keys = sorted(arrays)
        mlx = mlx_layout.is_mlx_layout(keys)
        summary = {
            "file": str(path),
            "layout": "mlx" if mlx else "plain safetensors",
            "tensors": len(keys),
            "bytes": sum(math.prod(arrays.spec(k)[0]) * _itemsize(arrays.spec(k)[1]) for k in keys),
        }
        if not mlx:
            problems.append(
                f"not an optimizer checkpoint: a safetensors file of {len(keys)} tensors without treeopt "
                f"metadata or MLX's optimizer layout (model parameters?), e.g. {keys[:3]}"
            )
        return summary, problems
    if metadata.get("format") != validate.FORMAT:
        return {"file": str(path), "format": metadata.get("format"), "tensors": len(arrays)}, [
            f"not an optimizer checkpoint: a treeopt file of format {metadata.get('format')!r} "
            f"({len(arrays)} tensors), expected {validate.FORMAT!r}"
        ]
    try:
        validate.metadata(metadata)
        validate.tensors(arrays, metadata)
    except CheckpointError as error:
        return {"file": str(path), "format_version": metadata.get("format_version")}, [str(error)]
    groups = {
        o["name"]: {
            "type": o["type"],
            "parameters": 0,
            "elements": 0,
            "bytes": 0,
            "hyperparameters": o["hyperparameters"],
        }
        for o in metadata["optimizers"]
    }
    for path_, info in metadata["parameters"].items():
        group = groups.get(info["owner"])
        if group is None:
            problems.append(f"{path_}: owned by unknown optimizer {info['owner']!r}")
            continue
        group["parameters"] += 1
        for slot, spec in info["slots"].items():
            key = slot_key(path_, slot)
            array = arrays.get(key)
            if array is None:
                problems.append(f"{key}: in the metadata but not stored")
                continue
            if list(array.shape) != spec["shape"] or array.dtype.name != spec["dtype"]:
                problems.append(
                    f"{key}: stored as {array.dtype.name}{list(array.shape)}, "
                    f"metadata says {spec['dtype']}{spec['shape']}"
                )
            group["bytes"] += array.nbytes
        shapes = [s["shape"] for s in info["slots"].values()]
        group["elements"] += math.prod(max(shapes, key=math.prod)) if shapes else 0
    for name, group in groups.items():
        rate = arrays.get(f"@{name}/learning_rate")
        group["learning_rate"] = None if rate is None else float(rate)
    summary = {
        "file": str(path),
        "format_version": metadata["format_version"],
        "treeopt_version": metadata.get("treeopt_version"),
        "step": metadata.get("step"),
        "groups": groups,
        "checksum": "ok",
    }
    return summary, problems


def not_a_checkpoint(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be a checkpoint file, in one line (a folder, another format), or
    None when it may be one (a safetensors file: the reader checks the rest)."""
    if os.path.isdir(path):
        inside = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        hint = (
            f"; the safetensors files in it: {', '.join(inside[:6])}{', ...' if len(inside) > 6 else ''} "
            f"(python -m treeopt.checkpoint info {os.path.join(path, inside[0])})"
            if inside
            else ""
        )
        return f"{path} is a folder, not a checkpoint (a checkpoint saved by several ranks has a treeopt.json){hint}"
    if not os.path.exists(path):
        return f"{path}: No such file or folder"
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError as error:
        return f"cannot read {path}: {error.strerror or error}"
    if head[:4] == b"PK\x03\x04":  # a zip: torch.save's format, or NumPy's .npz
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith("data.pkl") for name in names):
            return (
                f"{path} is a PyTorch file (torch.save), not a treeopt checkpoint: those are safetensors "
                "files written by treeopt.checkpoint.save"
            )
        return (
            f"{path} is a zip archive ({'NumPy .npz' if any(n.endswith('.npy') for n in names) else 'not NumPy'}), "
            "not a safetensors file: info reads safetensors files (checkpoint.load reads MLX's .npz)"
        )
    # a safetensors file starts with the length of its JSON header (8 bytes, little-endian) and "{"
    if len(head) < 9 or head[8:9] != b"{" or int.from_bytes(head[:8], "little") > os.path.getsize(path):
        return f"{path} is not a safetensors file (treeopt checkpoints are safetensors files)"
    return None


def _itemsize(dtype):
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _print(summary, problems, width=None):
    """The summary as text that fits ``width`` columns (the terminal's by default)."""
    width = width or _text.terminal_width()
    lines = [line for k, v in summary.items() if k != "groups" for line in _text.hanging(f"{k}: {v}", width)]
    groups = summary.get("groups", {})
    if groups:
        rows = [["group", "type", "parameters", "elements", "state bytes", "lr"]] + [
            [
                name,
                g["type"],
                str(g["parameters"]),
                f"{g['elements']:,}",
                f"{g['bytes']:,}",
                _text.number(g["learning_rate"], 6),
            ]
            for name, g in groups.items()
        ]
        lines += _text.table(rows, width, foldable={0})
        for name, g in groups.items():
            hyper = ", ".join(f"{k}={_value(v)}" for k, v in g["hyperparameters"].items())
            lines += _text.hanging(f"{name}  {hyper}", width)
    for problem in problems:
        lines += _text.hanging(f"problem: {problem}", width)
    if not problems:
        lines.append("no problem found")
    print("\n".join(lines))


def _value(v):
    """A hyper-parameter as people write it: ``0.02``, not ``0.019999999552965164``."""
    if isinstance(v, float):
        return _text.number(v, 6)
    if isinstance(v, list):
        return "[" + ", ".join(map(_value, v)) + "]"
    return str(v)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m treeopt.checkpoint", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="summarise a checkpoint and check it")
    info.add_argument("file")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    summary, problems = inspect(args.file)
    if args.json:
        print(json.dumps(dict(summary, problems=problems), indent=2))
    else:
        _print(summary, problems)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
