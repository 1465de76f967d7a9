"""What routing costs per step: a MultiOptimizer against one optimizer on the same tensors.

    python benchmarks/routing.py [--rounds 15]

Both sides are AdamW with the same settings; the MultiOptimizer splits the tree into three
groups by path. Routes are decided once, so a step costs a lookup per path on the general
path, and one compiled loop per group on the compiled path. Timed interleaved, in one
process; prints the medians and the ratio.
"""

import argparse
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from step import many_shapes, small_shapes  # noqa: E402

import treeopt as optim  # noqa: E402
import treeopt.kernels as kernels  # noqa: E402


def setup(shapes, make, compiled):
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    grads = {k: rng.standard_normal(s, dtype=np.float32) * 0.01 for k, s in shapes.items()}
    opt = make()

    def step():
        kernels.enabled = compiled
        try:
            opt.update(params, grads)
        finally:
            kernels.enabled = True
    step()
    return step


def three_groups():
    third = lambda k: int(k.split(".")[1]) % 3  # noqa: E731
    return optim.MultiOptimizer([optim.AdamW(1e-3), optim.AdamW(1e-3), optim.AdamW(1e-3)],
                                [lambda p, w: third(p) == 0, lambda p, w: third(p) == 1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args(argv)
    tiny = {f"layers.{i}.weight": (4,) for i in range(2000)}  # the step is all overhead
    for tree, shapes in (("2,000 tensors of 4 elements: the per-step overhead alone", tiny),
                         ("2,000 tensors of 64x64", many_shapes()), ("10M transformer", small_shapes())):
        if tree.startswith("10M"):
            shapes = {k: v for k, v in shapes.items() if k.startswith("layers.")}
        print(f"== {tree} ({len(shapes)} tensors)", flush=True)
        for compiled in (True, False):
            candidates = {"AdamW": setup(shapes, lambda: optim.AdamW(1e-3), compiled),
                          "MultiOptimizer, 1 group": setup(shapes, lambda: optim.MultiOptimizer([optim.AdamW(1e-3)]), compiled),
                          "MultiOptimizer, 3 groups": setup(shapes, three_groups, compiled)}
            times = {k: [] for k in candidates}
            for _ in range(args.rounds):
                for name, step in candidates.items():
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
            base = statistics.median(times["AdamW"])
            path = "compiled step" if compiled else "per-tensor path (TREEOPT_KERNELS=0)"
            for name, samples in times.items():
                median = statistics.median(samples)
                print(f"   {path:<36} {name:<26} {median * 1e3:8.2f} ms  {median / base:6.3f}x", flush=True)


if __name__ == "__main__":
    main()
