"""The NumPy demo, no framework needed: train the digits MLP with Muon + AdamW, then with
AdamW alone, and compare.

    python -m treeopt.demo digits [--steps N] [--seed S] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from treeopt.demo import model, training
from treeopt.demo.cli import positive_int as _positive
from treeopt.demo.dataset import train_test_split
from treeopt.tree import tree_flatten
from treeopt.types import Tree

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import treeopt as optim
    from treeopt.demo.training import Run

DEFAULT_STEPS = 300
QUICK_STEPS = 20
BATCH_SIZE = 128
#: a correct backward pass differs from finite differences by about 1e-9 in float64
GRADIENT_TOLERANCE = 1e-6


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo's options."""
    parser = argparse.ArgumentParser(
        prog="python -m treeopt.demo digits",
        description="Train a small NumPy MLP on the 8x8 handwritten digits with Muon + AdamW "
        "(a treeopt MultiOptimizer), then with plain AdamW, and compare.",
    )
    parser.add_argument(
        "--steps",
        type=_positive,
        default=None,
        help=f"training steps of each run (default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the split, the initial weights and the batch order (default 0)"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps only, for a smoke test")
    parser.add_argument(
        "--batch-size", type=_positive, default=BATCH_SIZE, help=f"examples per step (default {BATCH_SIZE})"
    )
    parser.add_argument(
        "--log-every",
        type=_positive,
        default=None,
        help="print the loss every this many steps (default: 10 lines per run)",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        default=None,
        help="save each run's parameters and optimizer state in DIR at the end, and "
        "resume from there when DIR holds a checkpoint",
    )
    parser.add_argument(
        "--stop-after",
        type=_positive,
        default=None,
        metavar="N",
        help="stop each run after step N (to resume later with --checkpoint)",
    )
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    if args.log_every is None:
        args.log_every = max(1, args.steps // 10)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Run]:
    """Run the demo; returns ``{"Muon + AdamW": Run, "AdamW": Run}`` (see
    :class:`treeopt.demo.training.Run`)."""
    args = parse_args(argv)
    started = time.perf_counter()
    with one_blas_thread():
        runs = _demo(args)
    print(f"\nTotal time {time.perf_counter() - started:.1f} s.")
    return runs


def one_blas_thread() -> AbstractContextManager[object]:
    """The demo's matrices are 128 x 128: a second BLAS thread costs more in hand-offs than it
    saves, and on a busy machine its spinning makes each product several times slower. Use
    one thread (with threadpoolctl, from the ``demo`` extra), unless the environment says
    otherwise."""
    import os

    if any(v in os.environ for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _demo(args):
    data = train_test_split(args.seed)
    x_train, _, x_test, _ = data
    sizes = model.DEFAULT_SIZES
    count = sum(p.size for _, p in tree_flatten(model.init_mlp(sizes, args.seed)))
    errors = model.check_gradients(seed=args.seed)
    worst = max(errors.values())

    print("treeopt demo: Muon + AdamW (one MultiOptimizer) vs plain AdamW, 8x8 handwritten digits")
    print(f"  data      {len(x_train)} train / {len(x_test)} test images, 64 pixels, 10 classes")
    print(f"  model     MLP {' -> '.join(map(str, sizes))}, GELU, {count:,} float32 parameters")
    print(
        f"  backprop  finite-difference check (float64): max relative error {worst:.1e} "
        f"{'ok' if worst < GRADIENT_TOLERANCE else 'MISMATCH'}"
    )
    print(
        f"  training  {args.steps} steps of {args.batch_size} examples, seed {args.seed}; linear warm-up "
        f"then cosine decay to 10%; gradients clipped to norm {training.MAX_GRAD_NORM}"
    )

    setups = [("Muon + AdamW", training.muon_adamw), ("AdamW", training.adamw_only)]
    runs = {}
    for number, (name, make) in enumerate(setups, 1):
        params = model.init_mlp(sizes, args.seed)  # the same start for both runs
        optimizer, groups = make(args.steps)
        if number == 1:
            print("\nWhich optimizer owns which parameter (the plan the MultiOptimizer uses):")
            optimizer.plan(params).print()  # routes every parameter now, from the filters
        start = resume(args.checkpoint, name, params, optimizer)
        print(f"\n[{number}/{len(setups)}] {name}" + (f" (resumed at step {start})" if start else ""))
        print(f"  {'step':>6}  {'batch loss':>10}  {'test acc':>9}  lr: {' / '.join(g.name for g in groups)}")
        runs[name] = training.train(
            name,
            params,
            optimizer,
            data,
            args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            log_every=args.log_every,
            start=start,
            stop=args.stop_after,
        )
        if args.checkpoint:
            save(args.checkpoint, name, params, optimizer)
    print_comparison(list(runs.values()))
    return runs


def _files(folder, name):
    import os

    stem = os.path.join(folder, name.replace(" + ", "_").replace(" ", "_").lower())
    return f"{stem}.params.safetensors", f"{stem}.optimizer.safetensors"


def save(folder: str, name: str, params: Tree, optimizer: optim.Optimizer) -> None:
    """Write the run's parameters and optimizer state (atomically, checksummed)."""
    import os

    from treeopt import checkpoint
    from treeopt.checkpoint import files

    os.makedirs(folder, exist_ok=True)
    params_file, optimizer_file = _files(folder, name)
    files.write(params_file, dict(tree_flatten(params)), {"format": "treeopt-demo-parameters"})
    checkpoint.save(optimizer, optimizer_file)
    print(f"  saved {params_file} and {optimizer_file}")


def resume(folder: str | None, name: str, params: Tree, optimizer: optim.Optimizer) -> int:
    """Load the run's checkpoint into ``params`` (in place) and ``optimizer`` if ``folder``
    has one; returns the step to resume from (0 without a checkpoint)."""
    import os

    from treeopt import checkpoint
    from treeopt.checkpoint import files

    if not folder:
        return 0
    params_file, optimizer_file = _files(folder, name)
    if not (os.path.exists(params_file) and os.path.exists(optimizer_file)):
        return 0
    saved, _ = files.read(params_file)
    for path, value in tree_flatten(params):
        value[...] = saved[path]
    checkpoint.load(optimizer, optimizer_file, params=params)
    return int(optimizer.step)


def print_comparison(runs: Sequence[Run]) -> None:
    """The final table, and which run did better on what."""
    steps = runs[0].steps
    plural = "" if steps == 1 else "s"
    print(f"\nAfter {steps} step{plural} each (same seed, same initial weights, same batches):")
    width = max(len(r.name) for r in runs)
    print(f"  {'run':<{width}}  {'train loss':>10}  {'test loss':>9}  {'test acc':>8}  {'time':>7}")
    for r in runs:
        print(
            f"  {r.name:<{width}}  {r.train_loss:10.5f}  {r.test_loss:9.4f}  "
            f"{100 * r.test_accuracy:7.1f}%  {r.seconds:6.2f}s"
        )
    print("  (train loss: on the whole training set after the last step; time: the training steps;")
    print(f"   one test image is {100 / runs[0].test_size:.2f}% of the test accuracy)")
    print(f"  lower train loss:     {_winner(runs, lambda r: r.train_loss)}")
    print(f"  lower test loss:      {_winner(runs, lambda r: r.test_loss)}")
    print(f"  higher test accuracy: {_winner(runs, lambda r: -round(r.test_accuracy, 6))}")
    print(f"  faster:               {_winner(runs, lambda r: r.seconds)}")


def _winner(runs, key):
    values = [key(r) for r in runs]
    best = min(values)
    winners = [r.name for r, v in zip(runs, values) if v == best]
    if len(winners) > 1 or not np.isfinite(best):
        return "tie"
    return winners[0]
