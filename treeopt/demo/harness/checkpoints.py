"""Stop and resume the demo's runs: per run, the model's weights, the optimizer's state (a
treeopt checkpoint, keyed by parameter name) and the curve so far. ``optimizer`` is the
run's :class:`treeopt.torch.Optimizer`; the file holds its treeopt optimizer's state."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from treeopt import checkpoint
from treeopt.demo.harness.training import Curve

if TYPE_CHECKING:
    import os

    from treeopt.torch.optimizer import Optimizer as TorchOptimizer


def _files(folder, setup):
    stem = pathlib.Path(folder) / setup.replace(" ", "_").lower()
    return stem.with_suffix(".model.pt"), stem.with_suffix(".optimizer.safetensors"), stem.with_suffix(".curve.json")


def save(
    folder: str | os.PathLike[str],
    setup: str,
    model: torch.nn.Module,
    optimizer: TorchOptimizer,
    step: int,
    curve: Curve,
    seconds: Sequence[float],
) -> None:
    """Write the run's three files; the curve file last, so it marks a complete checkpoint."""
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    model_file, optimizer_file, curve_file = _files(folder, setup)
    torch.save(model.state_dict(), model_file)
    checkpoint.save(optimizer.optimizer, str(optimizer_file))
    progress = {"step": step, "seconds": list(seconds), "curve": vars(curve)}
    curve_file.write_text(json.dumps(progress).replace("NaN", "null"))


def saved_step(folder: str | os.PathLike[str] | None, setup: str) -> int:
    """The step at which the run's checkpoint in ``folder`` stopped (0 without one)."""
    if not folder:
        return 0
    curve_file = _files(folder, setup)[2]
    return int(json.loads(curve_file.read_text())["step"]) if curve_file.exists() else 0


def resume(
    folder: str | os.PathLike[str] | None, setup: str, model: torch.nn.Module, optimizer: TorchOptimizer
) -> tuple[int, Curve | None, tuple[float, ...]]:
    """Load the run's checkpoint from ``folder`` into ``model`` and ``optimizer`` if there is
    one. Returns ``(step, curve, (wall, CPU) seconds)``: ``(0, None, (0.0, 0.0))`` without one."""
    if not folder:
        return 0, None, (0.0, 0.0)
    model_file, optimizer_file, curve_file = _files(folder, setup)
    if not curve_file.exists():
        return 0, None, (0.0, 0.0)
    progress = json.loads(curve_file.read_text())
    model.load_state_dict(torch.load(model_file, weights_only=True))
    checkpoint.load(optimizer.optimizer, str(optimizer_file), params=dict(model.named_parameters()))
    curve = Curve(**{k: [float("nan") if v is None else v for v in values] for k, values in progress["curve"].items()})
    return progress["step"], curve, tuple(progress["seconds"])
