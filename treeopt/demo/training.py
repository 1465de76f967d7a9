"""The two optimizer set-ups the demo compares, and the training loop they share.

Both runs use the same warm-up + cosine schedule shape, gradient clipping, seed, initial
weights and batches; only the optimizers differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

import treeopt as optim
from treeopt.demo import model
from treeopt.types import Schedule, Tree

#: peak learning rates, from a small sweep on this data set (Muon 0.01-0.1, AdamW 1e-3 to
#: 1e-2, 3-5 seeds): Muon's orthogonalised steps have a fixed size (every singular value about
#: 1), so its rate is an order of magnitude larger than AdamW's
MUON_LR = 0.02
ADAMW_LR = 3e-3
#: the default of both Muon and AdamW. The two use it differently: AdamW's decay is
#: decoupled (w *= 1 - lr * wd, tiny here), Muon's is coupled as in MLX (wd * w is added to
#: the gradient before orthogonalisation), so once the gradients get small Muon's steps
#: mostly shrink the weights: a real regulariser, which keeps its training loss higher
WEIGHT_DECAY = 0.01
#: gradients are clipped to this global norm before every step (both runs)
MAX_GRAD_NORM = 1.0


def warmup_cosine(peak: float, steps: int, warmup_fraction: float = 0.1, end_fraction: float = 0.1) -> Schedule:
    """A linear warm-up from 0 to ``peak`` over the first ``warmup_fraction`` of ``steps``,
    then half a cosine down to ``end_fraction * peak`` at the end of training."""
    warmup = max(1, round(steps * warmup_fraction))
    return optim.join_schedules(
        [
            optim.linear_schedule(0.0, peak, warmup),
            optim.cosine_decay(peak, max(1, steps - warmup), end=peak * end_fraction),
        ],
        [warmup],
    )


def is_hidden_matrix(path: str, param: np.ndarray) -> bool:
    """Filter: the weight matrices of the hidden layers (``layers.<i>.weight``), Muon's
    share. The input layer and the head stay with AdamW, as Muon's authors advise."""
    return path.startswith("layers.") and param.ndim == 2


def is_bias(path: str, param: np.ndarray) -> bool:
    """Filter: the biases (every vector), which get no weight decay."""
    return param.ndim == 1


@dataclass(frozen=True)
class Group:
    """One optimizer of a set-up, for the report: its name, peak lr and weight decay."""

    name: str
    peak_lr: float
    weight_decay: float


def muon_adamw(steps: int) -> tuple[optim.MultiOptimizer, list[Group]]:
    """The Muon + AdamW set-up: a MultiOptimizer with three groups.

    Returns:
        ``(optimizer, groups)``: Muon for the hidden matrices, AdamW without weight decay
        for the biases, and AdamW for the rest (the input layer and the head).
    """
    groups = [
        Group("Muon", MUON_LR, WEIGHT_DECAY),
        Group("AdamW (no decay)", ADAMW_LR, 0.0),
        Group("AdamW", ADAMW_LR, WEIGHT_DECAY),
    ]
    muon, bias_adamw, adamw = (warmup_cosine(g.peak_lr, steps) for g in groups)
    optimizer = optim.MultiOptimizer(
        [
            optim.Muon(muon, weight_decay=groups[0].weight_decay),
            optim.AdamW(bias_adamw, weight_decay=groups[1].weight_decay),
            optim.AdamW(adamw, weight_decay=groups[2].weight_decay),
        ],
        [is_hidden_matrix, is_bias],
        names=[g.name for g in groups],
    )
    return optimizer, groups


def adamw_only(steps: int) -> tuple[optim.AdamW, list[Group]]:
    """The baseline: one AdamW for every parameter, with the AdamW group's schedule and
    weight decay.

    Returns:
        ``(optimizer, groups)``.
    """
    group = Group("AdamW", ADAMW_LR, WEIGHT_DECAY)
    return optim.AdamW(warmup_cosine(group.peak_lr, steps), weight_decay=group.weight_decay), [group]


def learning_rates(optimizer: optim.Optimizer) -> list[float]:
    """The current learning rate of each optimizer inside ``optimizer``, as floats."""
    rates = optimizer.learning_rate
    return [float(r) for r in (rates if isinstance(rates, list) else [rates])]


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless index batches: a fresh shuffle every epoch, the incomplete last batch
    dropped so that every step sees ``batch_size`` examples."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@dataclass
class Run:
    """The outcome of one training run."""

    name: str
    steps: int
    train_loss: float = float("nan")  # on the whole training set, after the last step
    test_loss: float = float("nan")
    test_accuracy: float = float("nan")
    test_size: int = 0  # images in the test set
    seconds: float = 0.0  # wall time of the training steps (evaluation excluded)
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, mean batch loss, test accuracy)


def train(
    name: str,
    params: Tree,
    optimizer: optim.Optimizer,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    steps: int,
    batch_size: int = 128,
    seed: int = 0,
    log_every: int = 100,
    log: Callable[[str], object] = print,
    start: int = 0,
    stop: int | None = None,
) -> Run:
    """Train ``params`` in place with ``optimizer`` for ``steps`` mini-batch steps.

    Args:
        name: the run's name, for the report.
        params: the model's parameter tree (see :mod:`treeopt.demo.model`); updated in place.
        optimizer: any treeopt optimizer.
        data: ``(x_train, y_train, x_test, y_test)``.
        seed: seeds the batch order, so runs with the same seed see the same batches.
        log_every: print the mean batch loss every this many steps (0: never).
        log: where the log lines go.
        start: the step to resume from (the batches before it are skipped, so a resumed run
            sees the batches an uninterrupted one would).
        stop: stop after this step (default ``steps``), e.g. to checkpoint and resume later.

    Returns:
        a :class:`Run`.
    """
    x_train, y_train, x_test, y_test = data
    run = Run(name, stop or steps)
    sampler = batches(len(y_train), min(batch_size, len(y_train)), np.random.default_rng(seed))
    for _ in range(start):
        next(sampler)
    recent = []
    elapsed = 0.0
    for step in range(start + 1, (stop or steps) + 1):
        began = time.perf_counter()
        index = next(sampler)
        loss, grads = model.loss_and_grads(params, x_train[index], y_train[index])
        grads, _ = optim.clip_grad_norm(grads, MAX_GRAD_NORM)
        optimizer.update(params, grads)
        elapsed += time.perf_counter() - began
        recent.append(loss)
        if log_every and (step % log_every == 0 or step == steps):
            accuracy = model.accuracy(params, x_test, y_test)
            run.history.append((step, float(np.mean(recent)), accuracy))
            rates = "  ".join(f"{r:.2e}" for r in learning_rates(optimizer))
            log(f"  {step:6d}  {np.mean(recent):10.4f}  {100 * accuracy:8.1f}%  {rates}")
            recent = []
    run.seconds = elapsed
    run.train_loss = model.loss(params, x_train, y_train)
    run.test_loss = model.loss(params, x_test, y_test)
    run.test_accuracy = model.accuracy(params, x_test, y_test)
    run.test_size = len(y_test)
    return run
