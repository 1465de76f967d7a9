"""What routing costs per step: a MultiOptimizer against one optimizer on the same tensors.

    python benchmarks/routing.py [--rounds 31] [--libraries numpy torch]

Every side is AdamW with bias correction on (as torch users run it) and the same settings;
the MultiOptimizers split the tree the ways models are routed:

- ``matrices | vectors``: two groups by ``ndim`` (big matrices in one, small vectors in the
  other: the split that a loop divided by tensor count handles worst);
- ``muon_adamw layout``: the three groups of :func:`treeopt.muon_adamw` (hidden matrices,
  no-decay vectors, embeddings and head), every group AdamW so the work is the same;
- ``layers % 3``: three groups by layer index.

Routes are decided once, so on the compiled path a step runs one parallel loop for all the
groups of one rule, its work split by elements. Timed interleaved in one process, round by
round; prints the medians and the ratio to one AdamW measured in the same rounds. A second
AdamW on its own copy of the tree is timed too: its ratio is the noise floor of the others
(on the compiled path, a group costs about a dozen Python calls a step; the rest of any
difference is the memory the tensors landed in and the machine's other work).
"""

import argparse
import importlib.util
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from step import cpu_name, many_shapes, small_shapes  # noqa: E402

import treeopt as optim  # noqa: E402
import treeopt.kernels as kernels  # noqa: E402
from treeopt.filters import is_bias, is_hidden_matrix, is_norm, ndim  # noqa: E402


def adamw(weight_decay=0.01):
    return optim.AdamW(1e-3, weight_decay=weight_decay, bias_correction=True)


def by_ndim():
    return optim.MultiOptimizer([adamw(), adamw(0.0)], [lambda p, w: w.ndim >= 2])


def muon_adamw_layout():
    return optim.MultiOptimizer([adamw(), adamw(0.0), adamw()], [is_hidden_matrix, is_bias | is_norm | ndim(max=1)])


def layers_mod_3():
    third = lambda p: int(p.split(".")[1]) % 3 if p.startswith("layers.") else 0  # noqa: E731
    return optim.MultiOptimizer([adamw(), adamw(), adamw()], [lambda p, w: third(p) == 0, lambda p, w: third(p) == 1])


CANDIDATES = {
    "AdamW": adamw,
    # the same optimizer on its own copy of the tree: how far apart two identical steps land
    # (allocation, page placement, the machine's other work); read the other ratios against it
    "AdamW, a second copy": adamw,
    "MultiOptimizer, 1 group": lambda: optim.MultiOptimizer([adamw()]),
    "matrices | vectors": by_ndim,
    "muon_adamw layout": muon_adamw_layout,
    "layers % 3": layers_mod_3,
}


def setup(shapes, make, compiled, library):
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    grads = {k: rng.standard_normal(s, dtype=np.float32) * 0.01 for k, s in shapes.items()}
    if library == "torch":
        import torch

        params = {k: torch.from_numpy(v) for k, v in params.items()}
        grads = {k: torch.from_numpy(v) for k, v in grads.items()}
    opt = make()

    def step():
        kernels.enabled = compiled
        try:
            opt.update(params, grads)
        finally:
            kernels.enabled = True

    step()
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--libraries", nargs="*", default=["numpy", "torch"])
    parser.add_argument("--no-reference", action="store_true", help="skip the per-tensor path")
    args = parser.parse_args(argv)
    libraries = [lib for lib in args.libraries if importlib.util.find_spec(lib)]
    warnings.simplefilter("ignore")  # groups that match nothing in a tree (no vectors in 2,000 x 64x64)
    print(
        f"CPU: {cpu_name()}; numba threads: {kernels.get_num_threads()}; other work may be running: "
        "every ratio is to one AdamW timed in the same rounds",
        flush=True,
    )
    tiny = {f"layers.{i}.weight": (4,) for i in range(2000)}  # the step is all overhead
    for tree, shapes in (
        ("2,000 tensors of 4 elements: the per-step overhead alone", tiny),
        ("2,000 tensors of 64x64", many_shapes()),
        ("10M transformer", small_shapes()),
    ):
        print(f"== {tree} ({len(shapes)} tensors)", flush=True)
        for library in libraries:
            for compiled in (True, False) if not args.no_reference else (True,):
                candidates = {name: setup(shapes, make, compiled, library) for name, make in CANDIDATES.items()}
                times = {k: [] for k in candidates}
                for _ in range(args.rounds):
                    for name, step in candidates.items():
                        start = time.perf_counter()
                        step()
                        times[name].append(time.perf_counter() - start)
                base = statistics.median(times["AdamW"])
                path = "compiled step" if compiled else "per-tensor path"
                for name, samples in times.items():
                    median = statistics.median(samples)
                    print(
                        f"   {library:<6} {path:<16} {name:<26} {median * 1e3:8.2f} ms  {median / base:6.3f}x",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
