"""Muon's recipes, one step each, against today's Muon (``"keller2024"``) in the same run.

    python benchmarks/muon_variants.py                 # the 10M tree, NumPy and torch, 7 rounds
    python benchmarks/muon_variants.py --quick --libraries numpy

The tree is ``benchmarks/step.py``'s ``small`` (a 12-layer d=256 transformer, about 10M
parameters), routed by ``muon_adamw``: Muon on the blocks' 48 matrices, AdamW on the rest.
Each candidate is ``muon_adamw``'s groups with a recipe's Muon (and each option of the nanochat recipe
alone, to see what costs), planned and warmed by two steps, then timed round by round,
interleaved, so a busy machine slows all alike; the table gives the median step and its ratio
to ``keller2024``'s on the same library.
"""

import argparse
import statistics
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--libraries", nargs="+", default=["numpy", "torch"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 rounds, the recipes only")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    try:
        import torch  # noqa: F401
    except ImportError:
        args.libraries = [lib for lib in args.libraries if lib != "torch"]
    print(f"{step_bench.cpu_name()}; the 10M tree ({len(step_bench.small_shapes())} tensors); {rounds} rounds")
    steps = {}
    for library in args.libraries:
        steps |= {name: setup() for name, setup in candidates(library, alone=not args.quick).items()}
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, run in steps.items():
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    print("\n| candidate | median step (ms) | x keller2024 |\n|---|---|---|")
    for name, values in times.items():
        library = name.split(":")[0]
        base = statistics.median(times[f"{library}: muon_adamw keller2024"])
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.1f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
