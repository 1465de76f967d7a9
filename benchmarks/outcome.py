"""The sweep behind the demo's settings: how good is tuned AdamW, and which Muon rate to route.

    python benchmarks/outcome.py [--steps 600] [--seeds 0 1] [--jobs 1]

1. AdamW alone (the demo's "AdamW" set-up): peak learning rate x beta2 at a 20% warm-up;
   then (1b) coordinate descent: the warm-up at the best rate and beta2, then the rate at
   the best warm-up (each walked along its grid until the best is bracketed or at the end).
2. muon_adamw (the demo's routed set-up): Muon's peak learning rate x Muon's weight decay at
   a 20% Muon warm-up, its AdamW groups at part 1's first best (20% warm-up); then (2b) from
   that grid's best, with the tuned AdamW of 1b for the AdamW groups: Muon's warm-up, then
   finer Muon rates (0.75x, 1.5x) at the best warm-up, walked the same way.
3. Muon everywhere (the demo's naive set-up) at the best settings of 2, every seed: how much
   the routing itself is worth, beyond one seed.

Every run trains the demo's GPT on one thread (``torch.set_num_threads(1)``) and appends one
JSON line to ``--results`` as it finishes; a run already there is not repeated, so the sweep
resumes where it stopped. At the end the table goes into ``docs/outcome.md`` (between its
``<!-- sweep -->`` markers) and to stdout. The best settings are those with the lowest final
validation loss, averaged over the seeds.
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: in the order they run: the likely best first, so a sweep cut short still brackets it
ADAMW_LRS = (3e-3, 5e-3, 2e-3, 8e-3, 1e-3)
#: further rates, walked to when the best is at the edge (not in part 1's grid)
ADAMW_MORE_LRS = (0.012,)
BETA2S = (0.99, 0.95)
#: AdamW's warm-ups (fractions of the steps), walked from part 1's 0.2 at its best rate and beta2
ADAMW_WARMUPS = (0.05, 0.1, 0.2, 0.3, 0.4)
MUON_LRS = (0.01, 0.02, 0.04, 0.08)
MUON_WEIGHT_DECAYS = (0.1, 0.0)
#: Muon's warm-ups, walked from part 2's 0.2 at its best rate and decay; then finer rates
#: around the best rate (part 2b)
MUON_WARMUPS = (0.05, 0.2)
MUON_FINE_FACTORS = (0.75, 1.5)
#: the settings only Muon reads: AdamW alone does not depend on them
MUON_FIELDS = ("muon_lr", "muon_weight_decay", "muon_warmup")


def run_one(job):
    """Train one set-up with one setting; returns its JSON record."""
    import torch

    from treeopt.demo import setups
    from treeopt.demo.harness import training

    torch.set_num_threads(1)
    setup, settings, seed, steps = job["setup"], job["hyper"], job["seed"], job["steps"]
    hyper = setups.Hyper(**settings)
    data = training.Data(context=64, batch_size=32)
    model = training.build_model(seed)
    optimizer = setups.make(setup, model, steps, hyper)
    began = time.perf_counter()
    # Muon's runs keep their curve (the step at which they reach AdamW's final loss)
    evaluations = 1 if setup == "AdamW" else 24
    curve, seconds = training.train(model, optimizer, data, steps, seed, evaluations=evaluations)
    return {
        **job,
        "final_val_loss": curve.val_loss[-1],
        "train_seconds": seconds[0],
        "cpu_seconds": seconds[1],
        "wall_seconds": time.perf_counter() - began,
        "curve": {"steps": curve.steps, "val_loss": curve.val_loss},
    }


def settings(setup, hyper):
    """The settings ``setup`` trained with: a field added to ``Hyper`` after a record was
    written takes the value the run had (Muon's weight decay and warm-up were AdamW's), and
    AdamW alone drops Muon's fields, so its runs count whatever Muon's defaults are now."""
    hyper = {"muon_weight_decay": hyper["weight_decay"], "muon_warmup": hyper["warmup"], **hyper}
    return {k: v for k, v in hyper.items() if not (setup == "AdamW" and k in MUON_FIELDS)}


def key(job):
    return json.dumps([job["setup"], settings(job["setup"], job["hyper"]), job["seed"], job["steps"]], sort_keys=True)


def load(path):
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [{**r, "hyper": settings(r["setup"], r["hyper"])} for r in records]
    return list({key(r): r for r in reversed(records)}.values())[::-1]  # a run saved twice counts once


def sweep(jobs, results_path, workers):
    done = {key(r) for r in load(results_path)}
    todo = [j for j in jobs if key(j) not in done]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already in {results_path}; {len(todo)} to go", flush=True)
    with ProcessPoolExecutor(workers) as pool:
        for future in as_completed([pool.submit(run_one, job) for job in todo]):  # saved as each finishes
            record = future.result()
            with open(results_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"  {record['setup']:<12} {record['hyper']} seed {record['seed']}: "
                f"val {record['final_val_loss']:.4f} ({record['train_seconds']:.0f} s)",
                flush=True,
            )


def mean_by_setting(records, setup, steps, seeds, complete=True, like=None):
    """``{setting: (mean final loss, [loss per seed])}``; only settings run on every seed
    unless ``complete=False``, and only those that share ``like``'s values (a dict) if given."""
    groups = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r["setup"] == setup and r["steps"] == steps and r["seed"] in seeds:
            if like is None or all(r["hyper"].get(k) == v for k, v in like.items()):
                groups.setdefault(json.dumps(r["hyper"], sort_keys=True), []).append(r["final_val_loss"])
    return {k: (sum(v) / len(v), v) for k, v in groups.items() if len(v) == len(seeds) or not complete}


def winners(records, steps, seeds):
    """The best setting of each part, or None: AdamW alone's; muon_adamw's among the runs
    with AdamW's best for its AdamW groups (part 2)."""
    adamw = mean_by_setting(records, "AdamW", steps, seeds)
    tuned = best(adamw)[0] if adamw else None
    routed = mean_by_setting(records, "muon_adamw", steps, seeds, like=tuned) if tuned else {}
    return tuned, best(routed)[0] if routed else None


def best(means):
    setting = min(means, key=lambda k: means[k][0])
    return json.loads(setting), means[setting][0]


def table(records, steps, seeds):
    lines = [
        f"Final validation loss (nats per byte) after {steps} steps, mean over seeds "
        f"{', '.join(map(str, seeds))} (each seed's value in brackets); **bold**: the best of each part "
        "among the settings run on every seed (muon_adamw's among those with AdamW's best settings for its "
        "AdamW groups); Muon everywhere (naive) runs at muon_adamw's best. Steps to target: for the runs that "
        "kept their curve, the step at which the validation loss first reached the best AdamW's final loss "
        "on the same seed, as a fraction of the steps (interpolated between 25 evaluations; per seed).",
        "",
        "| set-up | Muon lr | Muon wd | Muon warm-up | AdamW lr | beta2 | AdamW warm-up | final val loss "
        "| steps to target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tuned, routed = winners(records, steps, seeds)
    reached = steps_to_target(records, steps, seeds, tuned)
    for setup, winner in (("AdamW", tuned), ("muon_adamw", routed), ("Muon everywhere", None)):
        means = mean_by_setting(records, setup, steps, seeds, complete=False)
        if not means:
            continue
        order = ("muon_weight_decay", "muon_warmup", "muon_lr", "beta2", "warmup", "adamw_lr")
        for setting in sorted(means, key=lambda k: [json.loads(k).get(field, 0) for field in order]):
            h = json.loads(setting)
            mean, values = means[setting]
            cell = f"{mean:.4f} ({', '.join(f'{v:.3f}' for v in values)})"
            if len(values) < len(seeds):
                cell += f" ({len(values)} of {len(seeds)} seeds)"
            if h == winner:
                cell = f"**{cell}**"
            muon = [f"{h[field]:g}" if setup != "AdamW" else "-" for field in MUON_FIELDS]
            adamw = f"{h['adamw_lr']:g} | {h['beta2']:g} | {h['warmup']:g}"
            ratios = reached.get(setting, [])
            reach = ", ".join("-" if r is None else f"{r:.2f}" for r in ratios) if ratios else ""
            lines.append(f"| {setup} | {' | '.join(muon)} | {adamw} | {cell} | {reach} |")
    return "\n".join(lines)


def steps_to_target(records, steps, seeds, tuned):
    """``{setting: [fraction of the steps per seed, None where never reached]}`` for the runs
    with a curve, against ``tuned`` AdamW's final loss on each seed."""
    from treeopt.demo.harness.training import Curve

    if tuned is None:
        return {}
    target = {
        r["seed"]: r["final_val_loss"]
        for r in records
        if r["setup"] == "AdamW" and r["steps"] == steps and r["hyper"] == tuned
    }
    reached = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        points = r.get("curve", {})
        if r["setup"] == "AdamW" or r["steps"] != steps or r["seed"] not in target or len(points.get("steps", [])) < 3:
            continue
        curve = Curve(steps=list(points["steps"]), val_loss=list(points["val_loss"]))
        curve.seconds = curve.cpu_seconds = [0.0] * len(curve.steps)
        reach = curve.reach(target[r["seed"]])
        reached.setdefault(json.dumps(r["hyper"], sort_keys=True), []).append(
            None if reach is None else reach[0] / steps
        )
    return reached


def write_doc(markdown, doc=ROOT / "docs" / "outcome.md"):
    text = doc.read_text()
    start, end = "<!-- sweep -->", "<!-- /sweep -->"
    if start not in text or end not in text:
        raise SystemExit(f"{doc} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    doc.write_text(head + start + "\n" + markdown + "\n" + end + rest.split(end, 1)[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps",
        type=int,
        default=600,
        help="steps per run (default 600, the demo's)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each")
    parser.add_argument(
        "--muon-weight-decays",
        type=float,
        nargs="+",
        default=list(MUON_WEIGHT_DECAYS),
        help=f"Muon's weight decays in part 2 (default {' '.join(map(str, MUON_WEIGHT_DECAYS))})",
    )
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path("outcome.jsonl"))
    parser.add_argument("--no-doc", action="store_true", help="print the table, leave docs/outcome.md alone")
    parser.add_argument("--table-only", action="store_true", help="run nothing: the table of the results so far")
    args = parser.parse_args(argv)
    if args.table_only:
        return report(args)
    from treeopt.demo import setups

    default = setups.Hyper().to_dict()
    print(
        f"sweep: {args.steps} steps, seeds {args.seeds}, {args.jobs} job(s) of one thread; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        flush=True,
    )
    adamw = [{**default, "adamw_lr": lr, "beta2": b2} for b2 in BETA2S for lr in ADAMW_LRS]
    sweep(jobs("AdamW", adamw, args), args.results, args.jobs)
    coarse = best(mean_by_setting(load(args.results), "AdamW", args.steps, args.seeds, like={"warmup": 0.2}))[0]
    # 1b: the warm-up at the best rate, then the rate at the best warm-up
    first = coarse
    warmed = descend(args, "AdamW", coarse, "warmup", ADAMW_WARMUPS, {}, keep=("adamw_lr", "beta2"))[0]
    tuned, loss = descend(args, "AdamW", warmed, "adamw_lr", ADAMW_LRS + ADAMW_MORE_LRS, {}, keep=("beta2", "warmup"))
    print(
        f"best AdamW: lr {tuned['adamw_lr']:g}, beta2 {tuned['beta2']:g}, warm-up {tuned['warmup']:g}: {loss:.4f}",
        flush=True,
    )
    # 2: the coarse grid with part 1's first AdamW (20% warm-up) for the AdamW groups
    base = {**default, **first, "muon_warmup": 0.2}
    muon = [{**base, "muon_lr": lr, "muon_weight_decay": wd} for wd in args.muon_weight_decays for lr in MUON_LRS]
    sweep(jobs("muon_adamw", muon, args), args.results, args.jobs)
    coarse = best(mean_by_setting(load(args.results), "muon_adamw", args.steps, args.seeds, like=first))[0]
    # 2b: from its best, now with the tuned AdamW: Muon's warm-up, then finer rates at the best warm-up
    start = {**coarse, **tuned}
    warmed = descend(
        args, "muon_adamw", start, "muon_warmup", MUON_WARMUPS, tuned, keep=("muon_lr", "muon_weight_decay")
    )[0]
    rates = sorted({*MUON_LRS, *(round(warmed["muon_lr"] * f, 6) for f in MUON_FINE_FACTORS)})
    keep = ("muon_weight_decay", "muon_warmup")
    routed = descend(args, "muon_adamw", warmed, "muon_lr", rates, tuned, keep=keep)[0]
    print(
        f"best muon_adamw: Muon lr {routed['muon_lr']:g}, weight decay {routed['muon_weight_decay']:g}, "
        f"warm-up {routed['muon_warmup']:g}",
        flush=True,
    )
    sweep(
        [{"setup": "Muon everywhere", "hyper": routed, "seed": s, "steps": args.steps} for s in args.seeds],
        args.results,
        args.jobs,
    )
    report(args)


def jobs(setup, settings, args):
    return [{"setup": setup, "hyper": h, "seed": s, "steps": args.steps} for h in settings for s in args.seeds]


def neighbours(values, value):
    """The values next to ``value`` in the sorted ``values``."""
    values = sorted(values)
    i = values.index(value)
    return values[max(0, i - 1) : i] + values[i + 1 : i + 2]


def descend(args, setup, start, field, values, like, keep=()):
    """Coordinate descent on ``field``: run ``start`` with ``field`` at each of ``values`` (on
    every seed) and return the best setting and its loss among the runs of ``setup`` that
    share ``like``'s values and ``start``'s fields named in ``keep`` (``start`` itself
    runs too). ``values`` is a grid to walk: ``start``'s neighbours in it are tried, and then
    the best's, until the best is bracketed (or at the grid's end)."""
    while True:
        tried = [start[field], *neighbours(values, start[field])]
        sweep(jobs(setup, [{**start, field: v} for v in tried], args), args.results, args.jobs)
        means = mean_by_setting(
            load(args.results), setup, args.steps, args.seeds, like={**like, **{k: start[k] for k in keep}}
        )
        found, loss = best(means)
        if found[field] == start[field]:
            return found, loss
        start = found


def report(args):
    markdown = table(load(args.results), args.steps, args.seeds)
    print(markdown)
    if not args.no_doc:
        write_doc(markdown)


if __name__ == "__main__":
    main()
