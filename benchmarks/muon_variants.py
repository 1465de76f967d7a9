"""Muon's recipes, one step each, against today's Muon (``"keller2024"``) in the same run.

    python benchmarks/muon_variants.py                 # the 10M tree, NumPy and torch, 7 rounds
    python benchmarks/muon_variants.py --quick --libraries numpy
    python benchmarks/muon_variants.py --references    # each variant against its reference

The tree is ``benchmarks/step.py``'s ``small`` (a 12-layer d=256 transformer, about 10M
parameters), routed by ``muon_adamw``: Muon on the blocks' 48 matrices, AdamW on the rest.
Each candidate is ``muon_adamw``'s groups with a recipe's Muon (and each option of the
nanochat recipe alone, to see what costs), planned and warmed by two steps, then timed round
by round, interleaved (each round starting one candidate further on), so a busy machine slows
all alike; one library after the other. The table gives the median step (wall time and the
process's CPU time: on a machine shared with other jobs, the CPU time of one thread,
``--threads 1``, is the steadier) and its ratio to ``keller2024``'s on the same library.

``--references`` measures instead how close each variant comes to its float64 reference
(those of ``tests/test_muon_variants.py``, written from the papers and the code that runs
them): 10 float32 steps from the same weights and gradients, on every installed library; the
largest difference relative to the largest weight (the tests hold it under 1e-5) and relative
to the largest change of a weight (under 5e-5).
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

import step as step_bench

OPTIONS = {  # the nanochat recipe's options one at a time, with what they add
    "polar_express": dict(ns_coefficients="polar_express"),
    "row_equilibration": dict(row_equilibration=True),
    "renormalization": dict(renormalization=True),
    "normuon": dict(normuon="larger"),
    "cautious_weight_decay": dict(cautious_weight_decay=True),
}


def candidates(library, alone):
    import treeopt as optim
    from treeopt.presets import RECIPES

    def make(**muon):  # muon_adamw's groups, with Muon's options
        return optim.MultiOptimizer(
            [
                optim.Muon(0.02, weight_decay=0.01, decoupled_weight_decay=True, **muon),
                optim.AdamW(3e-4, weight_decay=0.01),
                optim.AdamW(3e-4, weight_decay=0.0),
            ],
            [lambda p, w: step_bench.is_hidden(p, w.shape), lambda p, w: w.ndim < 2],
        )

    found = {f"muon_adamw {v}": (lambda v=v: make(**RECIPES[v])) for v in RECIPES}
    if alone:
        found |= {f"keller2024 + {name}": (lambda o=o: make(**o)) for name, o in OPTIONS.items()}
    setups = {}
    for name, build in found.items():

        def setup(build=build):
            params, grads = step_bench.numpy_arrays(step_bench.small_shapes())
            if library == "torch":
                import torch

                params = {k: torch.from_numpy(v) for k, v in params.items()}
                grads = {k: torch.from_numpy(v) for k, v in grads.items()}
            opt = build()
            for _ in range(2):  # plans, compiles
                opt.update(params, grads)
            return lambda: opt.update(params, grads)

        setups[f"{library}: {name}"] = setup
    return setups


def reference_cases():
    """``(variant, shape, seed, scale, Muon's options, reference's name, reference)`` for each
    check of ``tests/test_muon_variants.py``: the same problems and references; ``reference``
    takes the weights and gradients."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
    import numpy as np
    import test_muon_variants as t

    lr, out = 0.02, dict(decoupled_weight_decay=True)
    pe = dict(ns_coefficients="polar_express")

    def blockwise(reference, spans, **kwargs):  # each block (expert) as a parameter of its own
        def run(w, grads):
            return np.concatenate([reference(w[a:b], [g[a:b] for g in grads], lr, **kwargs) for a, b in spans])

        return run

    def experts(w, grads):
        return np.stack([t.normuon_authors(w[e], [g[e] for g in grads], lr, weight_decay=0.1) for e in range(3)])

    def past_table(steps):
        def run(w, grads):
            w, m = w.astype(np.float64), np.zeros(w.shape)
            for g in grads:
                m = 0.95 * m + 0.05 * g
                w = w - lr * t.orthogonalise(0.05 * g + 0.95 * m, t.NS_TABLES_REFERENCE["polar_express"], steps, 1.02)
            return w

        return run

    cases = []
    for shape in ((24, 16), (16, 24), (16, 16)):
        run = lambda w, g: t.keller(w, g, lr, weight_decay=0.1)  # noqa: E731
        cases.append(("keller2024 (Muon itself)", shape, 0, 1.0, dict(weight_decay=0.1, **out), "Keller Jordan's", run))
    for shape in ((24, 16), (16, 16)):  # dion's scale shrinks wide matrices, treeopt's does not
        run = lambda w, g: t.dion_normuon(w, g, lr, weight_decay=0.1, normuon=False)  # noqa: E731
        options = dict(weight_decay=0.1, ns_eps=1e-8, **pe, **out)
        cases.append(("ns_coefficients='polar_express'", shape, 0, 1.0, options, "dion's Muon", run))
    for shape in ((24, 16), (16, 24), (16, 16)):
        run = lambda w, g: t.normuon_authors(w, g, lr, weight_decay=0.1)  # noqa: E731
        options = dict(weight_decay=0.1, normuon=True, **out)
        cases.append(("normuon=True", shape, 1, 1.0, options, "NorMuon's authors'", run))
    for shape in ((24, 16), (16, 16)):
        run = lambda w, g: t.dion_normuon(w, g, lr, weight_decay=2.0, cautious=True)  # noqa: E731
        options = dict(weight_decay=2.0, cautious_weight_decay=True, normuon="output", ns_eps=1e-8, **pe, **out)
        cases.append(
            ("normuon + polar_express + cautious_weight_decay", shape, 2, 0.05, options, "dion's NorMuon", run)
        )
    for shape, decay in (((16, 24), 0.5), ((16, 16), 0.5), ((24, 16), 0.0), ((24, 16), 0.5)):
        # a tall matrix: nanochat decays by the rate times sqrt(rows / cols), treeopt by the rate
        scaled = decay / np.sqrt(max(1.0, shape[0] / shape[1]))
        run = lambda w, g, scaled=scaled: t.nanochat(w, g, lr, weight_decay=scaled)  # noqa: E731
        options = dict(weight_decay=decay, **t.NANOCHAT)
        cases.append(
            (
                "nanochat recipe",
                shape,
                3,
                0.05,
                options,
                "nanochat's step",
                run,
            )
        )
    cases.append(
        (
            "split_sizes=(8, 4, 4)",
            (16, 6),
            5,
            1.0,
            dict(weight_decay=0.1, split_sizes=(8, 4, 4), **out),
            "Keller Jordan's, per block",
            blockwise(t.keller, [(0, 8), (8, 12), (12, 16)], weight_decay=0.1),
        )
    )
    cases.append(
        (
            "num_heads=3, normuon=True",
            (12, 8),
            6,
            1.0,
            dict(weight_decay=0.0, normuon=True, num_heads=3),
            "NorMuon's authors', per head",
            blockwise(t.normuon_authors, [(0, 4), (4, 8), (8, 12)]),
        )
    )
    cases.append(
        (
            "batch_axes=1, normuon=True",
            (3, 8, 6),
            7,
            1.0,
            dict(weight_decay=0.1, normuon=True, batch_axes=1, **out),
            "NorMuon's authors', per expert",
            experts,
        )
    )
    for steps in (3, 7):
        options = dict(weight_decay=0.0, ns_steps=steps, **pe)
        cases.append(
            (
                f"polar_express, ns_steps={steps}",
                (16, 24),
                9,
                1.0,
                options,
                "the last triple repeated",
                past_table(steps),
            )
        )
    return cases, t


def measure_references():
    import treeopt as optim

    cases, t = reference_cases()  # puts tests/ on the path
    from arrays import BACKENDS, available

    libraries = [b for b in BACKENDS if available(b)]
    print(
        "Each variant after 10 float32 steps against its float64 reference (2 steps for ns_steps): the largest "
        "difference relative to the largest weight, and to the largest change of a weight; the worst of "
        + ", ".join(libraries)
        + ".\n"
    )
    print("| variant | shape | weight decay | reference | max rel. difference | of the largest change |")
    print("|---|---|---|---|---|---|")
    for variant, shape, seed, scale, options, name, reference in cases:
        steps = 2 if "ns_steps" in options else 10
        weight, grads = t.problem(shape, steps=steps, seed=seed, scale=scale)
        theirs = reference(weight, grads)
        worst = [0.0, 0.0]
        for library in libraries:
            ours = t.run(optim.Muon(0.02, **options), weight, grads, library)
            worst[0] = max(worst[0], float(abs(ours - theirs).max() / abs(theirs).max()))
            worst[1] = max(worst[1], float(t.gap(ours, theirs, weight)))
        decay = f"{options['weight_decay']:g}" + (" (cautious)" if options.get("cautious_weight_decay") else "")
        print(f"| {variant} | {shape} | {decay} | {name} | {worst[0]:.1e} | {worst[1]:.1e} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--libraries", nargs="+", default=["numpy", "torch"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 rounds, the recipes only")
    parser.add_argument("--threads", type=int, default=0, help="torch's threads (default: torch's own)")
    parser.add_argument("--references", action="store_true", help="each variant against its reference, no timing")
    args = parser.parse_args(argv)
    if args.references:
        return measure_references()
    rounds = 3 if args.quick else args.rounds
    threads = ""
    try:
        import torch
    except ImportError:
        args.libraries = [lib for lib in args.libraries if lib != "torch"]
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        threads = f"; torch on {torch.get_num_threads()} thread(s)"
    print(f"{step_bench.cpu_name()}; the 10M tree ({len(step_bench.small_shapes())} tensors); {rounds} rounds{threads}")
    print(f"load average before: {load()}")
    import treeopt.kernels

    # AdamW's compiled loops build during the warm-up steps, not in a thread while steps are timed
    treeopt.kernels.load_in_background = False
    times = {}
    for library in args.libraries:  # one library at a time: the ratios are within a library
        steps = {name: setup() for name, setup in candidates(library, alone=not args.quick).items()}
        names = list(steps)
        times |= {name: [] for name in names}
        for r in range(rounds):
            # each round starts one candidate further on: what a step leaves behind (BLAS threads
            # still spinning, a cold cache) falls on every candidate alike
            for name in names[r % len(names) :] + names[: r % len(names)]:
                began, cpu = time.perf_counter(), time.process_time()
                steps[name]()
                times[name].append((time.perf_counter() - began, time.process_time() - cpu))
        del steps
    print(f"load average after: {load()}")
    print(
        "\n| candidate | median step (ms) | x keller2024 | median CPU time (ms) | x keller2024 |\n|---|---|---|---|---|"
    )
    for name, values in times.items():
        library = name.split(":")[0]
        base = [statistics.median(v[k] for v in times[f"{library}: muon_adamw keller2024"]) for k in (0, 1)]
        wall, cpu = (statistics.median(v[k] for v in values) for k in (0, 1))
        print(f"| {name} | {wall * 1e3:.1f} | {wall / base[0]:.2f} | {cpu * 1e3:.1f} | {cpu / base[1]:.2f} |")


def load():
    """The 1, 5 and 15-minute load averages (how busy the machine was)."""
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
