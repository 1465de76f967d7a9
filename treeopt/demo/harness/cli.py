"""The demo's command line: a small byte-level GPT trained three times on the same seed and
batches, with tuned AdamW, with Muon on every matrix, and with ``treeopt.muon_adamw``.

    python -m treeopt.demo [--steps N] [--seed S] [--out DIR] [--threads T] [--jobs J] [--quick]
                           [--checkpoint DIR [--stop-after N]]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from treeopt import _text
from treeopt.demo import setups

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from treeopt.demo.gpt import Config
    from treeopt.demo.harness.training import Curve, Data
    from treeopt.demo.setups import Hyper

DEFAULT_STEPS = 600
#: --quick's length: three runs of 50 steps at one thread take about 35 s on a 2-core Xeon
#: (a step costs 180-240 ms there), which leaves room for the imports and the evaluations
QUICK_STEPS = 50
#: validation points per run (besides step 0): --quick measures fewer, to save its minute
EVALUATIONS, QUICK_EVALUATIONS = 24, 5
DEFAULT_OUT = "treeopt-demo"
BATCH_SIZE, CONTEXT = 32, 64
NAMES = {"AdamW": "AdamW (tuned)", "Muon everywhere": "Muon everywhere (naive)", "muon_adamw": "muon_adamw (routed)"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m treeopt.demo",
        description="Train a small byte-level GPT on Python's standard library three times, same seed and "
        "batches: tuned AdamW, Muon on every matrix (naive), and treeopt.muon_adamw (Muon on the "
        "hidden matrices, AdamW on the rest). The default run takes several minutes (it says how many "
        "before it starts); --quick about a minute.",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"training steps of each run (default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batches (default 0)")
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help=f"folder for loss.png and results.json (default ./{DEFAULT_OUT})"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (default 1: the model is small, and on a busy machine a second "
        "thread waiting for the first costs more than it saves)",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="runs trained at once, in separate processes (default 1: one after the other); "
        "on a busy machine this also gives the three runs the same conditions",
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per run: about a minute")
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        default=None,
        help="save each run's model, optimizer and curve in DIR when it ends (or stops), and "
        "resume from there when DIR holds them",
    )
    parser.add_argument(
        "--stop-after",
        type=positive_int,
        default=None,
        metavar="N",
        help="stop each run after step N (resume later with --checkpoint)",
    )
    parser.add_argument(
        "--framework",
        default="torch",
        choices=["torch", "numpy", "jax", "mlx"],
        help="the model's library (default torch; the GPT is written for torch only)",
    )
    args = parser.parse_args(argv)
    if args.framework != "torch":
        parser.error(
            f"the demo's transformer is written in PyTorch only (--framework torch); for {args.framework}, "
            f"see the examples in the treeopt repository (examples/) and docs/getting-started.md"
        )
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    args.evaluations = QUICK_EVALUATIONS if args.quick else EVALUATIONS
    if args.stop_after is not None and not args.checkpoint:
        parser.error("--stop-after needs --checkpoint DIR (where the stopped runs are saved)")
    return args


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the demo. Returns the ``results.json`` record (``None`` for runs stopped by
    ``--stop-after``)."""
    args = parse_args(argv)
    try:
        # the demo extra: checked here, so that a missing package is one line saying what to install
        import matplotlib  # noqa: F401
        import torch  # noqa: F401
        from rich.console import Console
    except ImportError as error:
        raise SystemExit(
            f"the demo needs PyTorch, rich and matplotlib ({error}): "
            "pip install -e '.[demo]' from the treeopt checkout (NumPy only: python examples/numpy_digits.py)"
        ) from error
    console = Console()
    if not console.is_terminal:  # a log or a pipe: $COLUMNS, else 100 columns (rich's default is 80)
        console = Console(width=_text.terminal_width())
    return run(args, console)


def run(args: argparse.Namespace, console: Console) -> dict[str, Any] | None:
    # the modules that import torch, once main() has checked the demo extra is installed
    import torch

    from treeopt.demo.harness import report, training

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    hyper = setups.Hyper()
    data = training.Data(CONTEXT, BATCH_SIZE)
    config = training.gpt.Config(context=CONTEXT)
    out = pathlib.Path(args.out)
    count = sum(p.numel() for p in training.build_model(args.seed, config).parameters())
    console.print("[bold]treeopt demo[/]: routing Muon and AdamW in one optimizer, on a byte-level GPT")
    _say(
        console,
        f"  model     {config.layers} layers, width {config.width}, {config.heads} heads, context "
        f"{config.context}: {count / 1e6:.2f}M parameters (PyTorch {torch.__version__}, "
        f"{args.threads} thread{'s' if args.threads > 1 else ''})",
        f"  data      Python's standard library source (shipped, PSF licence): {len(data.train):,} "
        f"training bytes, {data.val_inputs.numel():,} validation bytes from held-out modules",
        f"  training  {args.steps} steps of {BATCH_SIZE} x {CONTEXT} bytes, seed {args.seed}, the same "
        f"batches for every run; each group's learning rate warms up (AdamW's over "
        f"{hyper.warmup:.0%} of the steps, Muon's over {hyper.muon_warmup:.0%}) then follows a cosine "
        f"to 0; gradient norm clipped to {hyper.max_grad_norm:g}",
        f"  output    {out.resolve()}/loss.png and results.json",
        indent=12,
    )
    _say(console, f"  time      {time_estimate(args, data, config, hyper)}", indent=12)

    plans = {}
    for number, setup in enumerate(setups.SETUPS, 1):
        model = training.build_model(args.seed, config)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plans[setup] = setups.make(setup, model, args.steps, hyper).plan()
        console.print(f"\n[bold][{number}/{len(setups.SETUPS)}] {NAMES[setup]}[/]: {setups.DESCRIPTIONS[setup]}")
        if setup == "muon_adamw":
            console.print("The routing plan (every parameter: its group, rule, state and learning rate):")
            console.print(plans[setup])
            _say(
                console,
                f"  (learning_rate is step 0's: each group's is a schedule, Muon's from 0 to "
                f"{hyper.muon_lr:g} over {hyper.muon_warmup:.0%} of the steps, AdamW's from 0 to "
                f"{hyper.adamw_lr:g} over {hyper.warmup:.0%}, then a cosine to 0)",
                indent=3,
            )
        if setup == "Muon everywhere":
            moved = plans[setup].diff(_plan_of("muon_adamw", model, args.steps, hyper)).moved
            _say(
                console,
                "  parameters that muon_adamw routes elsewhere: "
                + ", ".join(f"{path} ({here} -> {there})" for path, here, there in moved),
            )
        for warning in caught:
            _say(console, f"  {type(warning.message).__name__}: {warning.message}")

    console.print(f"\nTraining{' (' + str(args.jobs) + ' runs at once)' if args.jobs > 1 else ''}:")
    with _progress(console, args.steps) as reporters:
        if args.jobs == 1:
            runs = {setup: train_one(vars(args), setup, reporters[setup]) for setup in setups.SETUPS}
        else:
            runs = _train_in_processes(args, reporters)
    if any(r is None for r in runs.values()):
        console.print(
            f"\nStopped after step {args.stop_after}; run again with --checkpoint {args.checkpoint} to finish."
        )
        return None

    named = {NAMES[s]: r for s, r in runs.items() if r is not None}  # all of them (checked above)
    target, summary = report.summarise(named, args.steps)
    console.print()
    report.table(target, summary, console)
    out.mkdir(parents=True, exist_ok=True)
    report.plot(named, target, out / "loss.png")
    settings = {
        "steps": args.steps,
        "seed": args.seed,
        "threads": args.threads,
        "jobs": args.jobs,
        "batch_size": BATCH_SIZE,
        "context": CONTEXT,
        "model": dataclasses.asdict(config),
        "parameters": count,
    }
    record = report.write_json(
        out / "results.json",
        settings=settings,
        hyper=hyper.to_dict(),
        target=target,
        summary=summary,
        runs=named,
        plan=plans["muon_adamw"].to_dict(),
    )
    curves = {setup: r["curve"] for setup, r in runs.items() if r is not None}  # all of them, here
    _say(console, to_target(summary, args.steps), naive_versus_routed(curves["Muon everywhere"], curves["muon_adamw"]))
    _say(
        console,
        f"Wrote {out / 'loss.png'} and {out / 'results.json'}. Total {_duration(time.perf_counter() - started)}.",
    )
    return record


def _say(console: Console, *paragraphs: str, indent: int = 4) -> None:
    """Print each paragraph folded to the console's width, its later lines indented."""
    for paragraph in paragraphs:
        for line in _text.hanging(paragraph, console.width, indent):
            console.print(line, highlight=False, markup=False, soft_wrap=True)


def time_estimate(args: argparse.Namespace, data: Data, config: Config, hyper: Hyper) -> str:
    """How long the training will take here, timed now on a throwaway copy of the routed run
    (the dearest step: Newton-Schulz on 16 matrices, AdamW on the rest): a few steps after the
    first (which plans the step) and one evaluation."""
    # the modules that import torch, once main() has checked the demo extra is installed
    from treeopt.demo.harness import checkpoints, training

    model = training.build_model(args.seed, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = setups.make("muon_adamw", model, args.steps, hyper)
    training.train(model, optimizer, data, args.steps, args.seed, stop=1, evaluations=1)
    _, (wall, _) = training.train(model, optimizer, data, args.steps, args.seed, start=1, stop=4, evaluations=1)
    step = wall / 3
    began = time.perf_counter()
    training.validation_loss(model, data)
    evaluation = time.perf_counter() - began
    stop = min(args.steps, args.stop_after or args.steps)
    steps = sum(max(0, stop - checkpoints.saved_step(args.checkpoint, s)) for s in setups.SETUPS)
    evaluations = len(setups.SETUPS) * (args.evaluations + 1) * steps / (len(setups.SETUPS) * args.steps)
    at_once = min(args.jobs, len(setups.SETUPS), max(1, (os.cpu_count() or 1) // args.threads))
    total = (steps * step + evaluations * evaluation) / at_once
    quick = "" if args.quick else f"; --quick: {QUICK_STEPS} steps a run"
    return (
        f"about {_duration(total)} of training here ({steps:,} steps at about {1000 * step:.0f} ms, "
        f"timed just now{quick})"
    )


def _duration(seconds: float) -> str:
    """``"40 s"``, ``"7 minutes"``, ``"1.5 hours"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


def to_target(summary: Mapping[str, Mapping[str, Any]], steps: int) -> str:
    """When muon_adamw reached tuned AdamW's final loss, in steps and time; and, when another
    set-up got there first by wall time, which one, with its CPU time (which other work on the
    machine disturbs less)."""
    routed = summary[NAMES["muon_adamw"]]
    if routed["steps_to_target"] is None:
        return f"muon_adamw did not reach tuned AdamW's final loss in {steps} steps."
    line = (
        f"muon_adamw reached tuned AdamW's final loss in {routed['steps_ratio']:.2f}x the steps "
        f"and {routed['seconds_ratio']:.2f}x the time."
    )
    reached = {name: s for name, s in summary.items() if s["seconds_ratio"] is not None}
    first = min(reached, key=lambda name: reached[name]["seconds_ratio"])
    if first != NAMES["muon_adamw"]:
        other = reached[first]
        line += (
            f" By wall time {first} got there first ({other['seconds_ratio']:.2f}x the time against "
            f"{routed['seconds_ratio']:.2f}x; {other['ms_per_step']:.0f} against {routed['ms_per_step']:.0f} ms "
            f"a step; CPU time {other['cpu_seconds_ratio']:.2f}x against {routed['cpu_seconds_ratio']:.2f}x)."
        )
    return line


#: final gaps (nats per byte) the demo calls "about the same" and "slightly worse": the
#: sweep's two seeds differ by up to about 0.01 at the demo's settings
SAME_GAP, SMALL_GAP = 0.01, 0.05


def naive_versus_routed(naive: Curve, routed: Curve) -> str:
    """What the naive run cost, in words: its final gap to the routed run, its widest gap on
    the way (both curves are measured at the same steps), and, when the final gap is small,
    why that may be."""
    gaps = [n - r for n, r in zip(naive.val_loss, routed.val_loss)]
    widest = max(range(len(gaps)), key=gaps.__getitem__)
    line = (
        f"Muon everywhere (naive) ended at {naive.val_loss[-1]:.4f}, {gaps[-1]:+.3f} nats/byte from "
        f"muon_adamw's {routed.val_loss[-1]:.4f}; its widest gap was {gaps[widest]:+.3f}, at step "
        f"{naive.steps[widest]}."
    )
    if gaps[-1] < SMALL_GAP:
        verdict = "about the same as" if gaps[-1] < SAME_GAP else "only slightly worse than"
        line += (
            f" At the end the naive run is {verdict} the routed one; most of its cost is in the early "
            "steps. A likely reason: with 256 byte values the embedding and the head are 256 x 128 "
            "matrices, the size of the blocks' own, and each batch of 2,048 bytes touches most byte "
            "values in use; Muon's recipe (AdamW for embeddings and heads), which the guards follow, "
            "was made for vocabularies of tens of thousands of tokens, most unseen in a batch."
        )
    return line


def _plan_of(setup, model, steps, hyper):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return setups.make(setup, model, steps, hyper).plan()


@contextlib.contextmanager
def _progress(console: Console, steps: int) -> Iterator[dict[str, Callable[[int, float, float], None]]]:
    """``{set-up: report(step, loss, tokens/s)}``: a rich progress bar per run on a terminal;
    in a log or a pipe, where a bar redrawn in place would show only at the end, a line every
    5% of a run."""
    # rich: the demo extra's, checked by main()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not console.is_terminal:
        yield {setup: _Lines(console, NAMES[setup], steps) for setup in setups.SETUPS}
        return
    with Progress(
        TextColumn("  {task.description:<24}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tokens/s"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        yield {
            setup: _Bar(progress, progress.add_task(NAMES[setup], total=steps, loss="-", speed="-"))
            for setup in setups.SETUPS
        }


class _Bar:
    """Where a run reports its steps: a task of a rich progress display."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress, self.task = progress, task

    def __call__(self, step: int, loss: float, tokens_per_second: float) -> None:
        if loss == loss:  # not the NaN of the first report, before any step
            self.progress.update(self.task, completed=step, loss=f"{loss:.3f}", speed=f"{tokens_per_second:,.0f}")
        else:
            self.progress.update(self.task, completed=step)


class _Lines:
    """Where a run reports its steps, in a log: a line each time it passes another 5% of its
    steps, with the time it has left at its pace so far."""

    PARTS = 20  # a line every 5%

    def __init__(self, console: Console, name: str, steps: int) -> None:
        self.console, self.name, self.steps = console, name, steps
        self.shown, self.began, self.first = 0, 0.0, 0

    def __call__(self, step: int, loss: float, tokens_per_second: float) -> None:
        now = time.perf_counter()
        if loss != loss:  # the first report, before any step: where the run starts (resumed?)
            self.began, self.first, self.shown = now, step, step * self.PARTS // self.steps
            return
        mark = step * self.PARTS // self.steps  # integers: 90 / 600 / 0.05 is 2.9999999999999996
        if mark > self.shown:
            self.shown = mark
            spent = now - self.began
            left = (self.steps - step) * spent / max(1, step - self.first)
            self.console.print(
                f"  {self.name:<24} {step:>{len(str(self.steps))}}/{self.steps} {step / self.steps:4.0%}  "
                f"loss {loss:.3f}  {tokens_per_second:,.0f} tokens/s  "
                + (f"done in {_duration(spent)}" if step == self.steps else f"{_duration(left)} left"),
                highlight=False,
            )


def train_one(
    options: Mapping[str, Any], setup: str, report_step: Callable[[int, float, float], None]
) -> dict[str, Any] | None:
    """One run from start to end (or to ``--stop-after``), resumed from and saved to
    ``--checkpoint``; ``report_step(step, loss, tokens/s)`` is called as it goes. Returns
    ``{"curve", "seconds": (wall, cpu)}``, or ``None`` when stopped early."""
    # the modules that import torch, once main() has checked the demo extra is installed
    import torch

    from treeopt.demo.harness import checkpoints, training

    torch.set_num_threads(options["threads"])
    data = training.Data(CONTEXT, BATCH_SIZE)
    model = training.build_model(options["seed"], training.gpt.Config(context=CONTEXT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shown once, before training
        optimizer = setups.make(setup, model, options["steps"], setups.Hyper())
    steps, folder = options["steps"], options["checkpoint"]
    start, curve, seconds = checkpoints.resume(folder, setup, model, optimizer)
    stop = min(steps, options["stop_after"] or steps)
    report_step(start, float("nan"), 0.0)

    def on_step(step, loss, elapsed):
        if step % 5 == 0 or step == stop:
            report_step(step, loss, (step - start) * BATCH_SIZE * CONTEXT / max(elapsed - seconds[0], 1e-9))

    if start < stop:
        curve, seconds = training.train(
            model,
            optimizer,
            data,
            steps,
            options["seed"],
            start=start,
            stop=stop,
            curve=curve,
            seconds=seconds,
            on_step=on_step,
            evaluations=options["evaluations"],
        )
        if folder:
            checkpoints.save(folder, setup, model, optimizer, stop, curve, seconds)
    return {"curve": curve, "seconds": seconds} if stop == steps else None


def _train_in_processes(args, reporters):
    """The runs in ``args.jobs`` processes at once; their steps come back through a queue."""
    from treeopt.demo.harness.training import Curve  # torch, as above

    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
    with context.Manager() as manager, ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        queue = manager.Queue()
        futures = {setup: pool.submit(_run_in_process, vars(args), setup, queue) for setup in reporters}
        while not all(f.done() for f in futures.values()) or not queue.empty():
            try:
                setup, step, loss, speed = queue.get(timeout=0.2)
            except Exception:  # queue.Empty, from the manager's process
                continue
            reporters[setup](step, loss, speed)
        runs = {setup: f.result() for setup, f in futures.items()}
    return {
        setup: None if r is None else {"curve": Curve(**r["curve"]), "seconds": tuple(r["seconds"])}
        for setup, r in runs.items()
    }


def _run_in_process(options, setup, queue):
    run = train_one(options, setup, lambda step, loss, speed: queue.put((setup, step, loss, speed)))
    return None if run is None else {"curve": vars(run["curve"]), "seconds": run["seconds"]}
