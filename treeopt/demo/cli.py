"""The demo's command line: a small byte-level GPT trained three times on the same seed and
batches, with tuned AdamW, with Muon on every matrix, and with ``treeopt.muon_adamw``.

    python -m treeopt.demo [--steps N] [--seed S] [--out DIR] [--threads T] [--quick]
                           [--checkpoint DIR [--stop-after N]] [--framework torch]
    python -m treeopt.demo digits [...]     # the NumPy MLP, no framework needed
"""

import argparse
import dataclasses
import pathlib
import sys
import time
import warnings

DEFAULT_STEPS = 600
QUICK_STEPS = 100
DEFAULT_OUT = "treeopt-demo"
BATCH_SIZE, CONTEXT = 32, 64
NAMES = {"AdamW": "AdamW (tuned)", "Muon everywhere": "Muon everywhere (naive)",
         "muon_adamw": "muon_adamw (routed)"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m treeopt.demo",
        description="Train a small byte-level GPT on Python's standard library three times, same seed and "
                    "batches: tuned AdamW, Muon on every matrix (naive), and treeopt.muon_adamw (Muon on the "
                    "hidden matrices, AdamW on the rest). `python -m treeopt.demo digits` runs the NumPy MLP.")
    parser.add_argument("--steps", type=_positive, default=None,
                        help=f"training steps of each run (default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batches (default 0)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder for loss.png and results.json (default ./{DEFAULT_OUT})")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch threads (default 1: the model is small, and on a busy machine a second "
                             "thread waiting for the first costs more than it saves)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per run: under a minute")
    parser.add_argument("--checkpoint", metavar="DIR", default=None,
                        help="save each run's model, optimizer and curve in DIR when it ends (or stops), and "
                             "resume from there when DIR holds them")
    parser.add_argument("--stop-after", type=_positive, default=None, metavar="N",
                        help="stop each run after step N (resume later with --checkpoint)")
    parser.add_argument("--framework", default="torch", choices=["torch", "numpy", "jax", "mlx"],
                        help="the model's library (default torch; the GPT is written for torch only)")
    args = parser.parse_args(argv)
    if args.framework != "torch":
        parser.error(f"the transformer is written in PyTorch only (--framework torch); for an example without "
                     f"a framework run `python -m treeopt.demo digits`, and for {args.framework} see "
                     f"examples/ and docs/getting-started.md")
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    if args.stop_after is not None and not args.checkpoint:
        parser.error("--stop-after needs --checkpoint DIR (where the stopped runs are saved)")
    return args


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None):
    """Run the demo. ``python -m treeopt.demo digits ...`` runs :func:`treeopt.demo.digits.main`.
    Returns the ``results.json`` record (``None`` for runs stopped by ``--stop-after``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["digits"]:
        from treeopt.demo import digits

        return digits.main(argv[1:])
    args = parse_args(argv)
    try:
        import torch  # noqa: F401
        from rich.console import Console
    except ImportError as error:
        raise SystemExit(f"the demo needs PyTorch, rich and matplotlib ({error}): "
                         "pip install -e '.[demo]' (or `python -m treeopt.demo digits`, NumPy only)")
    console = Console()
    if not console.is_terminal:  # a log or a pipe: do not squeeze the tables into 80 columns
        console = Console(width=130)
    return run(args, console)


def run(args, console):
    import torch

    from treeopt.demo import report, setups, training_gpt

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    hyper = setups.Hyper()
    data = training_gpt.Data(CONTEXT, BATCH_SIZE)
    config = training_gpt.gpt.Config(context=CONTEXT)
    out = pathlib.Path(args.out)
    count = sum(p.numel() for p in training_gpt.build_model(args.seed, config).parameters())
    console.print(f"[bold]treeopt demo[/]: routing Muon and AdamW in one optimizer, on a byte-level GPT\n"
                  f"  model     {config.layers} layers, width {config.width}, {config.heads} heads, context "
                  f"{config.context}: {count / 1e6:.2f}M parameters (PyTorch {torch.__version__}, "
                  f"{args.threads} thread{'s' if args.threads > 1 else ''})\n"
                  f"  data      Python's standard library source (shipped, PSF licence): {len(data.train):,} "
                  f"training bytes, {data.val_inputs.numel():,} validation bytes from held-out modules\n"
                  f"  training  {args.steps} steps of {BATCH_SIZE} x {CONTEXT} bytes, seed {args.seed}, the same "
                  f"batches for every run; {hyper.warmup:.0%} warm-up then cosine to 0; gradient norm clipped "
                  f"to {hyper.max_grad_norm:g}\n"
                  f"  output    {out.resolve()}/loss.png and results.json")

    runs, plans = {}, {}
    for number, setup in enumerate(setups.SETUPS, 1):
        name = NAMES[setup]
        model = training_gpt.build_model(args.seed, config)  # the same start for every run
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer = setups.make(setup, model, args.steps, hyper)
        plans[setup] = optimizer.plan()
        console.print(f"\n[bold][{number}/{len(setups.SETUPS)}] {name}[/]: {setups.DESCRIPTIONS[setup]}")
        if setup == "muon_adamw":
            console.print("The routing plan (every parameter: its group, rule, state and learning rate):")
            console.print(plans[setup])
        if setup == "Muon everywhere":
            moved = plans[setup].diff(_plan_of("muon_adamw", model, args.steps, hyper)).moved
            console.print("  parameters that muon_adamw routes elsewhere: "
                          + ", ".join(f"{path} ({here} -> {there})" for path, here, there in moved))
        for warning in caught:
            console.print(f"  [yellow]{type(warning.message).__name__}[/]: {warning.message}")
        runs[setup] = _train(args, name, setup, model, optimizer, data, console)
    if any(r is None for r in runs.values()):
        console.print(f"\nStopped after step {args.stop_after}; run again with --checkpoint {args.checkpoint} "
                      "to finish.")
        return None

    named = {NAMES[s]: r for s, r in runs.items()}
    target, summary = report.summarise(named, args.steps)
    console.print()
    report.table(target, summary, console)
    out.mkdir(parents=True, exist_ok=True)
    report.plot(named, target, out / "loss.png")
    settings = {"steps": args.steps, "seed": args.seed, "threads": args.threads, "batch_size": BATCH_SIZE,
                "context": CONTEXT, "model": dataclasses.asdict(config),
                "parameters": count}
    record = report.write_json(out / "results.json", settings=settings, hyper=hyper.to_dict(), target=target,
                               summary=summary, runs=named, plan=plans["muon_adamw"].to_dict())
    routed = summary[NAMES["muon_adamw"]]
    if routed["steps_to_target"] is not None:
        console.print(f"muon_adamw reached tuned AdamW's final loss in {routed['steps_ratio']:.2f}x the steps "
                      f"and {routed['seconds_ratio']:.2f}x the time.")
    console.print(f"Wrote {out / 'loss.png'} and {out / 'results.json'}. "
                  f"Total {time.perf_counter() - started:.0f} s.")
    return record


def _plan_of(setup, model, steps, hyper):
    from treeopt.demo import setups

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return setups.make(setup, model, steps, hyper).plan()


def _train(args, name, setup, model, optimizer, data, console):
    """One run with a progress bar, resumed from and saved to ``--checkpoint``. Returns
    ``{"curve", "seconds"}``, or ``None`` when stopped early by ``--stop-after``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from treeopt.demo import checkpoints, training_gpt

    start, curve, seconds = checkpoints.resume(args.checkpoint, setup, model, optimizer)
    stop = min(args.steps, args.stop_after or args.steps)
    tokens = BATCH_SIZE * CONTEXT
    columns = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tokens/s"),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(name, total=args.steps, completed=start, loss="-", speed="-")

        def on_step(step, loss, elapsed):
            progress.update(task, completed=step, loss=f"{loss:.3f}",
                            speed=f"{(step - start) * tokens / max(elapsed - seconds[0], 1e-9):,.0f}")

        if start < stop:
            curve, seconds = training_gpt.train(model, optimizer, data, args.steps, args.seed, start=start,
                                                stop=stop, curve=curve, seconds=seconds, on_step=on_step)
    if start < stop and args.checkpoint:
        checkpoints.save(args.checkpoint, setup, model, optimizer, stop, curve, seconds)
    if stop < args.steps:
        return None
    return {"curve": curve, "seconds": seconds}
