"""One training run of the demo's GPT: the loop, the validation curve, and when it reached
a target loss.

Every run on a seed starts from the same weights and sees the same batches in the same
order; only the optimizer differs. Wall time counts the training steps only (not the
evaluations).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from treeopt.demo import gpt, text

if TYPE_CHECKING:
    from treeopt.torch.optimizer import Optimizer as TorchOptimizer


@dataclass
class Curve:
    """The validation loss at some steps (step 0 included), with the training time spent up
    to that step (wall seconds, and CPU seconds of this process, which a busy machine
    disturbs less) and the mean training loss since the previous point."""

    steps: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)

    def add(self, step: int, seconds: float, cpu_seconds: float, val_loss: float, train_loss: float) -> None:
        self.steps.append(step)
        self.seconds.append(seconds)
        self.cpu_seconds.append(cpu_seconds)
        self.val_loss.append(val_loss)
        self.train_loss.append(train_loss)

    def reach(self, target: float) -> tuple[float, ...] | None:
        """``(step, seconds, cpu_seconds)`` at which the validation loss first reaches
        ``target``, interpolated linearly between evaluations; ``None`` if it never does."""
        for i, loss in enumerate(self.val_loss):
            if loss <= target:
                if i == 0:
                    return 0.0, 0.0, 0.0
                t = (self.val_loss[i - 1] - target) / (self.val_loss[i - 1] - loss)
                return tuple(xs[i - 1] + t * (xs[i] - xs[i - 1]) for xs in (self.steps, self.seconds, self.cpu_seconds))
        return None


class Data:
    """The training text and a fixed validation set, as torch tensors."""

    def __init__(self, context: int, batch_size: int, validation_sequences: int = 256) -> None:
        train, validation = text.train_validation()
        self.context, self.batch_size = context, batch_size
        self.train = torch.from_numpy(train.astype(np.int64))
        starts = text.validation_starts(len(validation), context, validation_sequences)
        windows = torch.from_numpy(validation.astype(np.int64))[
            torch.from_numpy(starts)[:, None] + torch.arange(context + 1)
        ]
        self.val_inputs, self.val_targets = windows[:, :-1], windows[:, 1:]

    def batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.train[torch.from_numpy(starts)[:, None] + torch.arange(self.context + 1)]
        return windows[:, :-1], windows[:, 1:]

    def schedule(self, steps: int, seed: int) -> np.ndarray:
        """The batches of a run: ``(steps, batch_size)`` start offsets from ``seed``."""
        return text.batch_starts(len(self.train), self.context, self.batch_size, steps, seed)


@torch.no_grad()
def validation_loss(model: gpt.GPT, data: Data, chunk: int = 64) -> float:
    losses = [
        model.loss(data.val_inputs[i : i + chunk], data.val_targets[i : i + chunk]).item()
        for i in range(0, len(data.val_inputs), chunk)
    ]
    return float(np.mean(losses))


def evaluation_steps(steps: int, evaluations: int = 24) -> list[int]:
    """About ``evaluations`` evenly spaced steps in ``[0, steps]``, both ends included."""
    every = max(1, round(steps / evaluations))
    return sorted(set(range(0, steps, every)) | {steps})


def train(
    model: gpt.GPT,
    optimizer: TorchOptimizer,
    data: Data,
    steps: int,
    seed: int,
    *,
    start: int = 0,
    stop: int | None = None,
    curve: Curve | None = None,
    seconds: Sequence[float] = (0.0, 0.0),
    on_step: Callable[[int, float, float], None] | None = None,
    evaluations: int = 24,
) -> tuple[Curve, tuple[float, float]]:
    """Train ``model`` (a :class:`gpt.GPT`) in place with ``optimizer`` (a
    :class:`treeopt.torch.Optimizer` of it) for steps ``start + 1 .. stop`` of ``steps``.

    ``curve`` and ``seconds`` (wall, CPU) carry a resumed run's history. ``on_step(step, loss, seconds)``
    is called after every step (for a progress bar). The validation loss is measured at step
    0 and about ``evaluations`` times more. Returns ``(curve, seconds)``.
    """
    stop = steps if stop is None else stop
    curve = curve if curve is not None else Curve()
    schedule = data.schedule(steps, seed)
    evaluate_at = set(evaluation_steps(steps, evaluations))
    if start == 0 and not curve.steps:
        curve.add(0, 0.0, 0.0, validation_loss(model, data), float("nan"))
    wall, cpu = seconds
    recent = []
    for step in range(start + 1, stop + 1):
        began, began_cpu = time.perf_counter(), time.process_time()
        inputs, targets = data.batch(schedule[step - 1])
        batch_loss = model.loss(inputs, targets)
        batch_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = batch_loss.item()
        wall += time.perf_counter() - began
        cpu += time.process_time() - began_cpu
        recent.append(loss)
        if step in evaluate_at:
            curve.add(step, wall, cpu, validation_loss(model, data), float(np.mean(recent)))
            recent = []
        if on_step is not None:
            on_step(step, loss, wall)
    return curve, (wall, cpu)


def build_model(seed: int, config: gpt.Config = gpt.Config()) -> gpt.GPT:
    return gpt.build(seed, config)
