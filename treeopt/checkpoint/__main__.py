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
from collections.abc import Sequence
from typing import Any

import numpy as np

from treeopt.checkpoint import files
from treeopt.checkpoint.base import slot_key
from treeopt.checkpoint.format import CheckpointError


def inspect(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """``(summary dict, problems list)`` of a checkpoint file, or of a folder saved by
    several ranks (every slot must be stored and its rows covered exactly once)."""
    from treeopt.checkpoint import mlx_layout, validate
    from treeopt.distributed import files as folders

    if folders.is_folder_checkpoint(path):
        return folders.inspect(path)
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


def _itemsize(dtype):
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _print(summary, problems):
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # type: ignore[misc, assignment]  # plain text below
    lines = [f"{k}: {v}" for k, v in summary.items() if k != "groups"]
    groups = summary.get("groups", {})
    if Console is None:
        print("\n".join(lines))
        for name, g in groups.items():
            print(
                f"  {name} ({g['type']}): {g['parameters']} parameters, {g['elements']:,} elements, "
                f"{g['bytes']:,} bytes, lr {g['learning_rate']}"
            )
    else:
        console = Console()
        console.print("\n".join(lines))
        if groups:
            table = Table("group", "type", "parameters", "elements", "state bytes", "lr", "hyper-parameters")
            for name, g in groups.items():
                hyper = ", ".join(f"{k}={v}" for k, v in g["hyperparameters"].items())
                table.add_row(
                    name,
                    g["type"],
                    str(g["parameters"]),
                    f"{g['elements']:,}",
                    f"{g['bytes']:,}",
                    "-" if g["learning_rate"] is None else f"{g['learning_rate']:.4g}",
                    hyper,
                )
            console.print(table)
    for problem in problems:
        print(f"problem: {problem}")
    if not problems:
        print("no problem found")


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
