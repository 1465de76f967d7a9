"""Routing on real architectures: how many tensors go to the wrong optimizer.

    python benchmarks/routing_corpus.py [--fast] [--models NAME ...] [--variant nanochat]

Builds every model of the routing corpus (``tests/routing_corpus.py``: transformers, mlx-lm,
flax, equinox and nanoGPT-style GPTs, tiny configurations, random weights), routes it with
``treeopt.muon_adamw`` as each framework's docs build it, takes one step, and compares each
tensor's route with Keller Jordan's recipe. Beside it, the rule most code uses, Muon for every
tensor with ``ndim >= 2``. Prints one line per model, the totals, and the mis-routes by cause
(what the tensor is). A model that fails to build or step counts as an error. ``--variant``
builds ``muon_adamw(variant=...)`` (``nanochat``: NorMuon's moments follow each weight's view).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import routing_corpus as corpus  # noqa: E402

import treeopt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="the default test run's subset only")
    parser.add_argument("--models", nargs="*", help="only the models whose names contain one of these")
    parser.add_argument(
        "--variant", default="keller2024", choices=sorted(treeopt.presets.RECIPES), help="Muon's recipe"
    )
    args = parser.parse_args()
    preset = functools.partial(treeopt.muon_adamw, variant=args.variant)
    cases = [c for c in corpus.CASES if (c.fast or not args.fast)]
    if args.models:
        cases = [c for c in cases if any(m in c.name for m in args.models)]
    totals = collections.Counter()
    causes: dict[str, collections.Counter] = {"treeopt": collections.Counter(), "ndim >= 2": collections.Counter()}
    print(f"{'model':36s} {'framework':9s} {'tensors':>7s} {'treeopt':>8s} {'ndim>=2':>8s}")
    for case in cases:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = corpus.run(case, preset)
        except Exception as error:  # a model treeopt cannot train is the worst mis-route
            totals["errors"] += 1
            print(f"{case.name:36s} {case.framework:9s} error: {type(error).__name__}: {str(error)[:120]}")
            continue
        wrong, naive = result.misroutes(), result.ndim_misroutes()
        totals.update(models=1, tensors=len(result.expected), treeopt=len(wrong), ndim=len(naive))
        causes["treeopt"].update(e.why for e, _ in wrong.values())
        causes["ndim >= 2"].update(e.why for e, _ in naive.values())
        seconds = time.perf_counter() - start
        print(
            f"{case.name:36s} {case.framework:9s} {len(result.expected):7d} {len(wrong):8d} {len(naive):8d}  {seconds:.1f} s"
        )
        for path, (expected, got) in wrong.items():
            print(f"    {path}: the recipe says {expected.route} ({expected.why}), treeopt {got}")
    print(
        f"\n{totals['models']} models, {totals['tensors']} tensors, {totals['errors']} errors; "
        f"mis-routed: treeopt {totals['treeopt']}, ndim >= 2 {totals['ndim']}"
    )
    for who, counter in causes.items():
        listed = ", ".join(f"{why} {n}" for why, n in counter.most_common()) or "none"
        print(f"mis-routes of {who} by what the tensor is: {listed}")


if __name__ == "__main__":
    main()
