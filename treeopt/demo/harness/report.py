"""What the demo shows at the end: a table per run, ``loss.png`` and ``results.json``."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy
import torch
from rich import box
from rich.table import Table

import treeopt
from treeopt import _text

if TYPE_CHECKING:
    from rich.console import Console

#: the runs' colours in the plot (AdamW, Muon everywhere, muon_adamw)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c")


def summarise(runs: Mapping[str, Mapping[str, Any]], steps: int) -> tuple[float, dict[str, dict[str, Any]]]:
    """Per run: final validation loss, and steps, wall time and CPU time to reach the target
    (the first run's, tuned AdamW's, final validation loss), also as ratios of the first
    run's totals. ``runs``: ``{name: {"curve": Curve, "seconds": (wall, cpu)}}``."""
    first = next(iter(runs.values()))
    target = first["curve"].val_loss[-1]
    base_wall, base_cpu = first["seconds"]
    summary = {}
    for name, run in runs.items():
        curve, (wall, cpu) = run["curve"], run["seconds"]
        reach = curve.reach(target)
        step, wall_to, cpu_to = reach or (None, None, None)
        summary[name] = {
            "final_val_loss": curve.val_loss[-1],
            "steps_to_target": step,
            "seconds_to_target": wall_to,
            "cpu_seconds_to_target": cpu_to,
            "steps_ratio": reach[0] / steps if reach else None,
            "seconds_ratio": reach[1] / base_wall if reach else None,
            "cpu_seconds_ratio": reach[2] / base_cpu if reach else None,
            "train_seconds": wall,
            "train_cpu_seconds": cpu,
            "ms_per_step": 1000 * wall / steps,
        }
    return target, summary


def table(target: float, summary: Mapping[str, Mapping[str, Any]], console: Console) -> None:
    """Per run: final validation loss, and the steps, wall time and CPU time it took to reach
    the target, each with its ratio to tuned AdamW's; narrow enough for 80 columns."""
    grid = Table(
        title=f"To tuned AdamW's final validation loss ({target:.4f} nats/byte):",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for column in ("run", "final loss", "steps to target", "time to target", "CPU time", "ms/step"):
        grid.add_column(column, justify="left" if column == "run" else "right", no_wrap=column != "run")
    for name, s in summary.items():
        reached = s["steps_to_target"] is not None
        grid.add_row(
            name,
            f"{s['final_val_loss']:.4f}",
            f"{s['steps_to_target']:.0f} ({s['steps_ratio']:.2f}x)" if reached else "not reached",
            f"{s['seconds_to_target']:.1f} s ({s['seconds_ratio']:.2f}x)" if reached else "-",
            f"{s['cpu_seconds_ratio']:.2f}x" if reached else "-",
            f"{s['ms_per_step']:.0f}",
        )
    console.print(grid)
    note = (
        "  x: of tuned AdamW's steps and time. Time: wall seconds of the training steps, evaluations "
        "excluded; CPU time: this process's, which other work on the machine disturbs less."
    )
    for line in _text.hanging(note, console.width, 2):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def plot(runs: Mapping[str, Mapping[str, Any]], target: float, path: str | os.PathLike[str]) -> None:
    """Validation loss against steps and against training seconds, the target dashed; and
    each run's loss minus the last run's (muon_adamw's) at the same steps, where gaps too
    small for the first two panels show."""
    import matplotlib  # here: pyplot must come after the backend is chosen

    matplotlib.use("Agg")  # files only, no window
    from matplotlib import pyplot as plt  # (see above)

    figure, (by_step, by_time, gaps) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    by_time.sharey(by_step)
    last = list(runs.values())[-1]["curve"]
    gap = {name: [a - b for a, b in zip(run["curve"].val_loss, last.val_loss)] for name, run in runs.items()}
    for (name, run), colour in zip(runs.items(), COLOURS):
        curve = run["curve"]
        by_step.plot(curve.steps, curve.val_loss, color=colour, label=name)
        by_time.plot(curve.seconds, curve.val_loss, color=colour, label=name)
        gaps.plot(curve.steps, gap[name], color=colour, label=name)
    for axes, label in ((by_step, "step"), (by_time, "training time (s)"), (gaps, "step")):
        axes.set_xlabel(label)
        axes.grid(alpha=0.3)
    for axes in (by_step, by_time):
        axes.axhline(target, color="grey", linestyle="--", linewidth=0.8)
    by_step.set_ylabel("validation loss (nats per byte)")
    lowest = min(min(r["curve"].val_loss) for r in runs.values())
    highest = max(max(r["curve"].val_loss) for r in runs.values())
    bottom = lowest - 0.1  # the start (a uniform guess, 5.5) is off the top: the end is what differs
    by_step.set_ylim(bottom=bottom, top=max(bottom + 0.5, min(highest, target + 1.5)))
    by_step.annotate(
        "tuned AdamW's final loss", (0, target), xytext=(4, 4), textcoords="offset points", fontsize=8, color="grey"
    )
    later = [g for values in gap.values() for g, step in zip(values, last.steps) if step > 0]
    gaps.set_ylim(bottom=min(-0.05, *later) - 0.02, top=min(1.0, max(0.1, *later)) + 0.02)
    gaps.set_title(f"gap to {list(runs)[-1]}", fontsize=10)
    gaps.set_ylabel("validation loss difference (nats per byte)")
    by_time.legend()
    figure.suptitle("Byte-level GPT on the Python standard library: one seed, the same batches")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "treeopt": getattr(treeopt, "__version__", None),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": _processor(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _processor():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(
    path: str | os.PathLike[str],
    *,
    settings: Mapping[str, Any],
    hyper: Mapping[str, Any],
    target: float,
    summary: Mapping[str, Mapping[str, Any]],
    runs: Mapping[str, Mapping[str, Any]],
    plan: Mapping[str, Any],
) -> dict[str, Any]:
    record = {
        "settings": settings,
        "hyperparameters": hyper,
        "versions": versions(),
        "target_val_loss": target,
        "runs": {
            name: {
                **summary[name],
                "curve": {
                    "step": run["curve"].steps,
                    "seconds": run["curve"].seconds,
                    "cpu_seconds": run["curve"].cpu_seconds,
                    "val_loss": run["curve"].val_loss,
                    "train_loss": [_finite(x) for x in run["curve"].train_loss],
                },
            }
            for name, run in runs.items()
        },
        "plan": plan,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1, allow_nan=False)
    return record


def _finite(value):
    """JSON has no NaN (the training loss before the first step): null instead."""
    return None if value != value else value
