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
4. Muon's recipes (``muon_adamw(variant=...)``: ``"keller2024"``, ``"nanochat"``), each from
   part 2's best Muon with the tuned AdamW for the AdamW groups: Muon's rate, then its
   warm-up, walked as in 2b. ``--part variants`` runs this part alone, from the demo's
   defaults (the tuned AdamW and Muon of ``docs/outcome.md``), with the tuned AdamW on every
   seed for the target. Its table goes between the ``<!-- variants -->`` markers.

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
#: part 4: the rates and warm-ups walked for each of Muon's recipes
VARIANT_LRS = (0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08)
VARIANT_WARMUPS = (0.05, 0.1, 0.2)
#: the settings only Muon reads: AdamW alone does not depend on them
MUON_FIELDS = ("muon_lr", "muon_weight_decay", "muon_warmup", "muon_variant")
#: what the columns of parts 1-3 show (part 4 adds the recipe)
SHOWN_MUON_FIELDS = ("muon_lr", "muon_weight_decay", "muon_warmup")


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
        "curve": {
            "steps": curve.steps,
            "val_loss": curve.val_loss,
            "seconds": curve.seconds,
            "cpu_seconds": curve.cpu_seconds,
        },
    }


def settings(setup, hyper):
    """The settings ``setup`` trained with: a field added to ``Hyper`` after a record was
    written takes the value the run had (Muon's weight decay and warm-up were AdamW's), and
    AdamW alone drops Muon's fields, so its runs count whatever Muon's defaults are now."""
    hyper = {
        "muon_weight_decay": hyper["weight_decay"],
        "muon_warmup": hyper["warmup"],
        "muon_variant": "keller2024",
        **hyper,
    }
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
    records = [r for r in records if r["hyper"].get("muon_variant", "keller2024") == "keller2024"]
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
            muon = [f"{h[field]:g}" if setup != "AdamW" else "-" for field in SHOWN_MUON_FIELDS]
            adamw = f"{h['adamw_lr']:g} | {h['beta2']:g} | {h['warmup']:g}"
            ratios = reached.get(setting, [])
            reach = ", ".join("-" if r is None else f"{r:.2f}" for r in ratios) if ratios else ""
            lines.append(f"| {setup} | {' | '.join(muon)} | {adamw} | {cell} | {reach} |")
    return "\n".join(lines)


def steps_to_target(records, steps, seeds, tuned, with_time=False):
    """``{setting: [fraction of the steps per seed, None where never reached]}`` for the runs
    with a curve, against ``tuned`` AdamW's final loss on each seed (``with_time``: ``(step,
    wall seconds, CPU seconds)`` at which it was reached, instead of the fraction)."""
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
        zeros = [0.0] * len(points["steps"])
        curve = Curve(
            steps=list(points["steps"]),
            val_loss=list(points["val_loss"]),
            seconds=list(points.get("seconds", zeros)),
            cpu_seconds=list(points.get("cpu_seconds", zeros)),
        )
        reach = curve.reach(target[r["seed"]])
        reached.setdefault(json.dumps(r["hyper"], sort_keys=True), []).append(
            None if reach is None else (reach[0] / steps if not with_time else reach)
        )
    return reached


def write_doc(markdown, doc=ROOT / "docs" / "outcome.md", marker="sweep"):
    text = doc.read_text()
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
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
    parser.add_argument(
        "--part",
        choices=("all", "variants"),
        default="all",
        help="all: parts 1-4; variants: part 4 alone, from the demo's defaults",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="Muon's recipes of part 4 (default: every one of treeopt.presets.RECIPES)",
    )
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path("outcome.jsonl"))
    parser.add_argument("--no-doc", action="store_true", help="print the table, leave docs/outcome.md alone")
    parser.add_argument("--table-only", action="store_true", help="run nothing: the table of the results so far")
    args = parser.parse_args(argv)
    from treeopt.demo import setups
    from treeopt.presets import RECIPES

    args.variants = args.variants or list(RECIPES)
    if args.table_only:
        return report(args)
    default = setups.Hyper().to_dict()
    print(
        f"sweep: {args.steps} steps, seeds {args.seeds}, {args.jobs} job(s) of one thread; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        flush=True,
    )
    if args.part == "variants":
        tuned = settings("AdamW", default)
        sweep(jobs("AdamW", [default], args), args.results, args.jobs)  # the target, on every seed
        variants(args, tuned, default)
        return report(args)
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
    variants(args, tuned, routed)
    report(args)


def variants(args, tuned, start):
    """Part 4: each of Muon's recipes from ``start``'s Muon with the ``tuned`` AdamW: Muon's
    rate, then its warm-up, each walked until the best is bracketed."""
    found = {}
    for variant in args.variants:
        like = {**tuned, "muon_variant": variant}
        setting = {**start, **like}
        setting = descend(
            args, "muon_adamw", setting, "muon_lr", VARIANT_LRS, like, keep=("muon_weight_decay", "muon_warmup")
        )[0]
        setting, loss = descend(
            args, "muon_adamw", setting, "muon_warmup", VARIANT_WARMUPS, like, keep=("muon_weight_decay", "muon_lr")
        )
        found[variant] = setting
        print(
            f"best {variant}: Muon lr {setting['muon_lr']:g}, warm-up {setting['muon_warmup']:g}: {loss:.4f}",
            flush=True,
        )
    return found


def variant_table(records, steps, seeds, variants):
    """Part 4's table: every setting run for each recipe, then the best of each recipe against
    the tuned AdamW, per seed, with the step and time at which it reached its final loss."""
    adamw = mean_by_setting(records, "AdamW", steps, seeds)
    if not adamw:
        return "No tuned AdamW on every seed yet: part 4 compares against it."
    tuned = best(adamw)[0]
    runs = {r["seed"]: r for r in records if r["setup"] == "AdamW" and r["steps"] == steps and r["hyper"] == tuned}
    reached = steps_to_target(records, steps, seeds, tuned, with_time=True)
    lines = [
        f"Muon's recipes with the tuned AdamW (lr {tuned['adamw_lr']:g}, beta2 {tuned['beta2']:g}, warm-up "
        f"{tuned['warmup']:g}) on the AdamW groups, {steps} steps, seeds {', '.join(map(str, seeds))}. Final "
        "validation loss: mean (per seed); steps to target: the fraction of the steps at which the validation "
        "loss first reached the tuned AdamW's final loss on the same seed (interpolated between 25 "
        "evaluations). **Bold**: each recipe's best (lowest mean final loss).",
        "",
        "| recipe | Muon lr | Muon wd | Muon warm-up | final val loss | steps to target |",
        "|---|---|---|---|---|---|",
    ]
    winners = {}
    for variant in variants:
        means = mean_by_setting(
            records, "muon_adamw", steps, seeds, complete=False, like={**tuned, "muon_variant": variant}
        )
        complete = {k: v for k, v in means.items() if len(v[1]) == len(seeds)}
        winner = best(complete)[0] if complete else None
        winners[variant] = winner
        for setting in sorted(means, key=lambda k: [json.loads(k)[f] for f in ("muon_warmup", "muon_lr")]):
            h, (mean, values) = json.loads(setting), means[setting]
            cell = f"{mean:.4f} ({', '.join(f'{v:.3f}' for v in values)})"
            cell = f"**{cell}**" if h == winner else cell
            reach = ", ".join("-" if r is None else f"{r[0] / steps:.2f}" for r in reached.get(setting, []))
            lines.append(
                f"| {variant} | {h['muon_lr']:g} | {h['muon_weight_decay']:g} | {h['muon_warmup']:g} | {cell} | {reach} |"
            )
    lines += [
        "",
        "Each recipe's best against the tuned AdamW, per seed: the step, and the wall and CPU seconds of that "
        "run's training steps (one thread), at which it reached the tuned AdamW's final loss. On a machine shared "
        "with other jobs the wall time follows the load more than the run; the CPU time is the steadier:",
        "",
        "| run | seed | final val loss | steps to target | x AdamW | wall s to target | x AdamW | CPU s to target "
        "| x AdamW |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        if seed in runs:
            r = runs[seed]
            wall, cpu = r["train_seconds"], r["cpu_seconds"]
            lines.append(
                f"| AdamW (tuned) | {seed} | {r['final_val_loss']:.4f} | {steps} | 1.00 | {wall:.0f} | 1.00 "
                f"| {cpu:.0f} | 1.00 |"
            )
    for variant, winner in winners.items():
        if winner is None:
            continue
        key_ = json.dumps(winner, sort_keys=True)
        by_seed = {
            r["seed"]: r for r in records if r["setup"] == "muon_adamw" and r["steps"] == steps and r["hyper"] == winner
        }
        for seed, reach in zip(sorted(s for s in by_seed if s in seeds), reached.get(key_, [])):
            r, base = by_seed[seed], runs.get(seed)
            if reach is None or base is None:
                cells = "- | - | - | - | - | -"
            else:
                step, wall, cpu = reach
                cells = (
                    f"{step:.0f} | {step / steps:.2f} | {wall:.0f} | {wall / base['train_seconds']:.2f} | {cpu:.0f} "
                    f"| {cpu / base['cpu_seconds']:.2f}"
                )
            lines.append(f"| muon_adamw {variant} | {seed} | {r['final_val_loss']:.4f} | {cells} |")
    return "\n".join(lines)


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
    records = load(args.results)
    markdown = table(records, args.steps, args.seeds)
    recipes = variant_table(records, args.steps, args.seeds, args.variants)
    print(markdown + "\n\n" + recipes)
    if not args.no_doc:
        if args.part == "all":
            write_doc(markdown)
        write_doc(recipes, marker="variants")


if __name__ == "__main__":
    main()
