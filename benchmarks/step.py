"""One optimizer step, timed against the memory-bandwidth bound and against the peers.

    python benchmarks/step.py                     # every tree, every installed library
    python benchmarks/step.py --closing           # the table docs/performance.md gives: 10M tree and 2,000 x 64x64 (~10 min)
    python benchmarks/step.py --trees many --quick
    python benchmarks/step.py --json results/step.json

An optimizer step is memory-bound: AdamW reads the parameter, gradient and two moments and
writes three arrays, 28 bytes per float32 parameter. The bound is measured in the same run:
a parallel loop with exactly AdamW's traffic (4 reads, 3 writes per element) over the same
number of elements. Every candidate is timed in the same process, interleaved round by round
(so a busy machine slows all of them alike); the table gives the median, the ratio to the
bound and the peak memory a step adds (resident set sampled during the step). treeopt's
first two steps (planning, compiling or loading kernels) are timed and printed apart.

Trees: ``gpt2`` (GPT-2 small: 124M parameters in 148 tensors), ``many`` (2,000 tensors of
64 x 64), ``small`` (a 12-layer d=256 transformer, about 10M parameters). Muon's time is
compared with the time of its matrix products alone (15 per matrix for 5 Newton-Schulz
iterations), measured in the same run the way Muon runs them: same-shape matrices stacked,
one batched product (NumPy ``matmul`` on 3-D arrays; ``torch.bmm`` for torch), re-timed in
every round. GPU rows (CUDA) are `benchmarks/gpu.py`'s, on a GPU machine.

Two things are timed in fresh processes, as a user meets them: the *cached start* (a second
process: ``import treeopt`` and the first AdamW steps on the 10M tree, numba's loops
loaded from the disk cache at the end of the first), and the *JAX compile* of a jitted Muon
step (treeopt and optax: tracing plus XLA's compile, then again in a second process from
JAX's persistent compilation cache), each stopped after ``--compile-limit`` seconds. JAX's Muon rows of
a tree are timed in the main process only when its compile finished within the limit.
"""

import argparse
import gc
import json
import os
import statistics
import threading
import time

import numpy as np

# --------------------------------------------------------------------------------- trees


def gpt2_shapes():
    shapes = {"wte": (50257, 768), "wpe": (1024, 768)}
    for i in range(12):
        p = f"h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (768,),
                p + "ln_1.bias": (768,),
                p + "attn.c_attn.weight": (768, 2304),
                p + "attn.c_attn.bias": (2304,),
                p + "attn.c_proj.weight": (768, 768),
                p + "attn.c_proj.bias": (768,),
                p + "ln_2.weight": (768,),
                p + "ln_2.bias": (768,),
                p + "mlp.c_fc.weight": (768, 3072),
                p + "mlp.c_fc.bias": (3072,),
                p + "mlp.c_proj.weight": (3072, 768),
                p + "mlp.c_proj.bias": (768,),
            }
        )
    shapes.update({"ln_f.weight": (768,), "ln_f.bias": (768,)})
    return shapes


def many_shapes():
    return {f"layers.{i}.weight": (64, 64) for i in range(2000)}


def small_shapes(d=256, layers=12, vocab=2048):
    shapes = {"embed.weight": (vocab, d)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "attn_norm.weight": (d,),
                p + "attn.qkv.weight": (3 * d, d),
                p + "attn.proj.weight": (d, d),
                p + "mlp_norm.weight": (d,),
                p + "mlp.fc.weight": (4 * d, d),
                p + "mlp.proj.weight": (d, 4 * d),
            }
        )
    shapes.update({"norm.weight": (d,), "head.weight": (vocab, d)})
    return shapes


TREES = {"gpt2": gpt2_shapes, "many": many_shapes, "small": small_shapes}


def is_hidden(path, shape):
    return len(shape) == 2 and path.startswith(("h.", "layers.")) and "norm" not in path


# --------------------------------------------------------------------------------- measuring
def cpu_name():
    """The CPU's model name and core count, as the kernel reports them."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]}, {len(names)} cores" if names else "unknown CPU"
    except OSError:
        return "unknown CPU"


class PeakMemory:
    """The largest growth of anonymous resident memory (RssAnon: not the page cache of
    mapped files) while the block runs, sampled every ~0.2 ms."""

    def _rss(self):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.added = self.peak - self.start


def bandwidth_kernel():
    """A parallel loop with AdamW's memory traffic: read p, g, m, v; write p, m, v."""
    import numba

    @numba.njit(parallel=True, fastmath=True)
    def stream(p, g, m, v):
        for i in numba.prange(p.size):
            gi = g[i]
            m[i] = m[i] + gi
            v[i] = v[i] + gi
            p[i] = p[i] + gi

    return stream


# --------------------------------------------------------------------------------- candidates
_GRADS = {}  # one set of gradients per tree, shared (read-only) by every candidate


def numpy_arrays(shapes, seed=0):
    """Fresh parameters (each candidate updates its own) and the tree's shared gradients."""
    rng = np.random.default_rng(seed)
    params = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in shapes.items()}
    key = tuple(shapes.items())
    if key not in _GRADS:
        _GRADS.clear()
        grads_rng = np.random.default_rng(seed + 1)
        _GRADS[key] = {k: (grads_rng.standard_normal(s, dtype=np.float32) * 0.01) for k, s in shapes.items()}
    return params, _GRADS[key]


def treeopt_candidates(kind, shapes, libraries):
    """``{name: (setup, step)}`` for treeopt on each library."""
    import treeopt as optim

    def make(module_optim, ns_dtype=None):
        if kind == "adamw":
            return optim.AdamW(1e-3, weight_decay=0.01)
        if kind == "sgd":
            return optim.SGD(1e-2, momentum=0.9)
        return optim.MultiOptimizer(
            [optim.Muon(0.02, ns_dtype=ns_dtype), optim.AdamW(3e-4), optim.AdamW(3e-4, weight_decay=0.0)],
            [lambda p, w: is_hidden(p, w.shape), lambda p, w: w.ndim < 2],
        )

    candidates = {}
    if "numpy" in libraries:

        def numpy_setup():
            params, grads = numpy_arrays(shapes)
            opt = make(optim)
            _first_steps("treeopt numpy", kind, lambda: opt.update(params, grads))  # plans, compiles
            return lambda: opt.update(params, grads)

        candidates["treeopt numpy"] = numpy_setup
    if "torch" in libraries:

        def torch_setup(ns_dtype=None, runner=None):
            import torch

            import treeopt.kernels

            params, grads = numpy_arrays(shapes)
            params = {k: torch.from_numpy(v) for k, v in params.items()}
            grads = {k: torch.from_numpy(v) for k, v in grads.items()}
            opt = make(optim, ns_dtype)
            label = "treeopt torch" + (f" (NS in {ns_dtype})" if ns_dtype else "") + (f" ({runner})" if runner else "")
            chosen, treeopt.kernels.torch_runner = treeopt.kernels.torch_runner, runner or "auto"
            try:  # the runner is chosen when the step is planned, in the first steps
                _first_steps(label, kind, lambda: opt.update(params, grads))
            finally:
                treeopt.kernels.torch_runner = chosen
            return lambda: opt.update(params, grads)

        candidates["treeopt torch"] = torch_setup
        if kind != "muon":  # what a torch user without numba gets: torch's foreach operations, driven by the rule
            candidates["treeopt torch (foreach, no numba)"] = lambda: torch_setup(runner="foreach")
        if kind == "muon":  # torch.optim.Muon runs Newton-Schulz in bfloat16: compare at its precision too
            candidates["treeopt torch (NS in bfloat16)"] = lambda: torch_setup("bfloat16")
    if "jax" in libraries:

        def treeopt_jax(params):
            import treeopt.jax as tj

            opt = make(optim)
            return tj.init(opt, params), lambda p, s, g: tj.update(opt, g, s, p)

        candidates["treeopt jax (jit, donated)"] = lambda: jax_runner(treeopt_jax, shapes)
    if "mlx" in libraries:
        candidates["treeopt mlx eager"] = lambda: mlx_runner(lambda: make(optim), shapes, compiled=False)
        candidates["treeopt mlx compiled"] = lambda: mlx_runner(lambda: make(optim), shapes, compiled=True)
    return candidates


FIRST_STEPS = []  # (candidate, optimizer, seconds of step 1, of step 2)
COMPILES = []  # JAX Muon compiles, timed in fresh processes
CACHED_START = {}  # a second process's import and first steps


def _first_steps(name, kind, step):
    times = [_timed(step), _timed(step)]
    FIRST_STEPS.append((name, kind, *times))


def jax_runner(make_step, shapes):
    """A jitted step (parameters and state donated) of ``make_step(params) -> (state,
    update(params, state, grads) -> (params, state))``, on JAX arrays."""
    import jax

    params, grads = numpy_arrays(shapes)
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)
    grads = jax.tree_util.tree_map(jax.numpy.asarray, grads)
    state, update = make_step(params)
    step = jax.jit(update, donate_argnums=(0, 1))
    box = [params, state]

    def run():
        box[0], box[1] = step(box[0], box[1], grads)
        jax.block_until_ready(box[0])

    run()
    return run


def mlx_runner(make_optimizer, shapes, compiled):
    """A step of an MLX optimizer (treeopt or mlx.optimizers) on a nested tree of MLX arrays,
    eager or under ``mx.compile`` with the state passed in and out."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    params, grads = numpy_arrays(shapes)
    # nested: mlx.optimizers.MultiOptimizer fails on dotted keys (KeyError, MLX's W4)
    params = tree_unflatten([(k, mx.array(v)) for k, v in params.items()])
    grads = tree_unflatten([(k, mx.array(v)) for k, v in grads.items()])
    opt = make_optimizer()
    opt.init(params)
    box = {"params": params}
    if compiled:

        @mx.compile
        def apply(p, s, g):
            opt.state = s
            return opt.apply_gradients(g, p), opt.state

        def run():
            box["params"], state = apply(box["params"], opt.state, grads)
            opt.state = state
            mx.eval(box["params"], opt.state)
    else:

        def run():
            box["params"] = opt.apply_gradients(grads, box["params"])
            mx.eval(box["params"], opt.state)

    run()
    return run


def peer_candidates(kind, shapes, libraries):
    candidates = {}
    if "torch" in libraries:
        import torch

        def torch_setup(mode):
            params, grads = numpy_arrays(shapes)
            tensors = [torch.nn.Parameter(torch.from_numpy(v)) for v in params.values()]
            for t, g in zip(tensors, grads.values()):
                t.grad = torch.from_numpy(g)
            flags = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[mode]
            if kind == "adamw":
                opts = [torch.optim.AdamW(tensors, lr=1e-3, weight_decay=0.01, **flags)]
            elif kind == "sgd":
                opts = [torch.optim.SGD(tensors, lr=1e-2, momentum=0.9, **flags)]
            else:
                names = list(params)
                hidden = [t for n, t in zip(names, tensors) if is_hidden(n, tuple(t.shape))]
                rest = [t for n, t in zip(names, tensors) if not is_hidden(n, tuple(t.shape))]
                muon_flags = {} if mode == "loop" else None
                if muon_flags is None or not hasattr(torch.optim, "Muon"):
                    return None
                opts = [torch.optim.Muon(hidden, lr=0.02)] + (
                    [torch.optim.AdamW(rest, lr=3e-4, **flags)] if rest else []
                )

            def run():
                for o in opts:
                    o.step()

            run()
            return run

        if kind == "muon":  # torch.optim.Muon has one implementation, Newton-Schulz in bfloat16
            candidates["torch.optim.Muon (NS in bfloat16)"] = lambda: torch_setup("loop")
        else:
            for mode in ("loop", "foreach", "fused"):
                candidates[f"torch.optim {mode}"] = lambda m=mode: torch_setup(m)
    if "jax" in libraries:

        def optax_step(params):
            import optax

            if kind == "adamw":
                tx = optax.adamw(1e-3, weight_decay=0.01)
            elif kind == "sgd":
                tx = optax.sgd(1e-2, momentum=0.9)
            else:
                labels = {k: "muon" if is_hidden(k, v.shape) else "adamw" for k, v in params.items()}
                tx = optax.multi_transform({"muon": optax.contrib.muon(0.02), "adamw": optax.adamw(3e-4)}, labels)

            def update(p, s, g):
                updates, s = tx.update(g, s, p)
                return optax.apply_updates(p, updates), s

            return tx.init(params), update

        candidates["optax (jit, donated)"] = lambda: jax_runner(optax_step, shapes)
    if "mlx" in libraries:

        def mlx_peer():
            import mlx.optimizers as mo

            if kind == "adamw":
                return mo.AdamW(1e-3, weight_decay=0.01)
            if kind == "sgd":
                return mo.SGD(1e-2, momentum=0.9)
            return mo.MultiOptimizer([mo.Muon(0.02), mo.AdamW(3e-4)], [lambda p, w: is_hidden(p, w.shape)])

        candidates["mlx.optimizers eager"] = lambda: mlx_runner(mlx_peer, shapes, compiled=False)
        candidates["mlx.optimizers compiled"] = lambda: mlx_runner(mlx_peer, shapes, compiled=True)
    return candidates


def matmul_runner(shapes, library="numpy", steps=5):
    """A step of Muon's matrix products alone for the hidden matrices of ``shapes``, batched as
    Muon batches them: same-shape matrices stacked, three products per Newton-Schulz step."""
    rng = np.random.default_rng(1)
    groups = {}
    for path, shape in shapes.items():
        if is_hidden(path, shape):
            groups.setdefault(tuple(sorted(shape)), []).append(path)
    stacks = [rng.standard_normal((len(paths),) + shape, dtype=np.float32) for shape, paths in groups.items()]
    if library == "torch":
        import torch

        stacks = [torch.from_numpy(x) for x in stacks]
        product, swap = torch.bmm, lambda x: x.transpose(1, 2)
    else:
        product, swap = np.matmul, lambda x: x.transpose(0, 2, 1)

    def run():
        for x in stacks:
            for _ in range(steps):
                gram = product(x, swap(x))
                product(product(gram, gram), x)

    return run


def matmul_bound(shapes, steps=5):
    """Seconds of Muon's matrix products alone, for the hidden matrices of ``shapes``, one
    matrix at a time."""
    total = 0.0
    rng = np.random.default_rng(1)
    for path, shape in shapes.items():
        if not is_hidden(path, shape):
            continue
        rows, cols = sorted(shape)
        x = rng.standard_normal((rows, cols), dtype=np.float32)
        gram = np.empty((rows, rows), np.float32)
        square = np.empty((rows, rows), np.float32)
        out = np.empty_like(x)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(steps):
                np.matmul(x, x.T, out=gram)
                np.matmul(gram, gram, out=square)
                np.matmul(square, x, out=out)
            best = min(best, time.perf_counter() - start)
        total += best
    return total


# --------------------------------------------------------------------------------- fresh processes
_CHILD_JAX = """
import sys, time, statistics
sys.path.insert(0, {folder!r})
import step as bench
import jax

if {cache!r}:  # JAX's persistent compilation cache (docs/performance.md), short compiles kept too
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
name, tree = {name!r}, {tree!r}
candidate = bench.jax_candidates("muon", bench.TREES[tree]())[name]
start = time.perf_counter()
run = candidate()  # traces, compiles and takes the first step
print("compile", time.perf_counter() - start, flush=True)
print("step", statistics.median(bench._timed(run) for _ in range(5)), flush=True)
"""

_CHILD_START = """
import time
start = time.perf_counter()
import numpy as np
import treeopt as optim
imported = time.perf_counter()
rng = np.random.default_rng(0)
shapes = {shapes!r}
params = {{k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}}
grads = {{k: rng.standard_normal(s, dtype=np.float32) * 0.01 for k, s in shapes.items()}}
opt = optim.AdamW(1e-3, weight_decay=0.01)
times = []
for _ in range(8):
    begin = time.perf_counter()
    opt.update(params, grads)
    times.append(time.perf_counter() - begin)
print("import", imported - start)
for k, seconds in enumerate(times):
    print(f"step{{k + 1}}", seconds)
"""


def fresh_process(source, limit):
    """``{key: seconds}`` printed by ``source`` run in a new interpreter, or ``None`` when it
    ran past ``limit`` seconds (or failed: the reason is printed)."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as stopped:
        values = _values(stopped.stdout or "")
        return values | {"stopped": limit}
    if done.returncode != 0:
        print(f"   (failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
        return None
    return _values(done.stdout)


def _values(text):
    if isinstance(text, bytes):
        text = text.decode()
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            values[key] = float(value)
        except ValueError:
            pass
    return values


def jax_compile_times(tree, limit):
    """``{candidate: {"compile": s, "step": s, "cached": s} or {"stopped": limit}}`` of a
    jitted Muon step: a new process with an empty persistent compilation cache, then a second
    one that finds the program in it (tracing, loading, the first step)."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(__file__))
    found = {}
    for name in ("treeopt jax (jit, donated)", "optax (jit, donated)"):
        with tempfile.TemporaryDirectory(prefix="jax-cache-") as cache:
            source = _CHILD_JAX.format(folder=folder, name=name, tree=tree, cache=cache)
            found[name] = fresh_process(source, limit)
            if found[name] and "compile" in found[name]:
                again = fresh_process(source, limit)
                if again and "compile" in again:
                    found[name]["cached"] = again["compile"]
    return found


def jax_candidates(kind, shapes):
    """treeopt's and optax's JAX candidates (for the fresh processes of the compile rows)."""
    return treeopt_candidates(kind, shapes, ["jax"]) | peer_candidates(kind, shapes, ["jax"])


# --------------------------------------------------------------------------------- running
def main(argv=None):
    import builtins
    import functools

    global print
    print = functools.partial(builtins.print, flush=True)  # progress shows in logs and pipes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="*", default=list(TREES), choices=list(TREES))
    parser.add_argument("--optimizers", nargs="*", default=["adamw", "muon", "sgd"], choices=["adamw", "muon", "sgd"])
    parser.add_argument("--libraries", nargs="*", default=["numpy", "torch", "jax", "mlx"])
    parser.add_argument("--no-peers", action="store_true", help="time treeopt only")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--all", action="store_true", help="also MLX eager on the 124M tree (minutes a step)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--closing",
        action="store_true",
        help="the table of docs/performance.md: trees small and many, AdamW and Muon (GPT-2 small: --trees gpt2)",
    )
    parser.add_argument(
        "--compile-limit", type=float, default=60, help="seconds before a JAX Muon compile is stopped (fresh process)"
    )
    args = parser.parse_args(argv)
    if args.closing:
        args.trees, args.optimizers = ["small", "many"], ["adamw", "muon"]
    rounds = 3 if args.quick else args.rounds
    libraries = [lib for lib in args.libraries if _installed(lib)]

    import numba

    import treeopt.kernels as kernels

    print(
        f"CPU: {cpu_name()}; numba threads: {kernels.get_num_threads()} "
        "(NUMBA_NUM_THREADS / TREEOPT_NUM_THREADS / OMP_NUM_THREADS); "
        f"load average {os.getloadavg()[0]:.2f} at the start (other work slows every candidate alike)"
    )
    compile_start = time.perf_counter()
    import treeopt as optim

    warm = {"w": np.zeros(8, np.float32)}
    for make in (lambda: optim.AdamW(1e-3), lambda: optim.SGD(1e-2, momentum=0.9)):
        opt = make()
        opt.update(warm, {"w": np.ones(8, np.float32)})
        opt.update(warm, {"w": np.ones(8, np.float32)})
    from treeopt.kernels.numba_kernels import cache_dir

    print(
        f"numba kernels ready in {time.perf_counter() - compile_start:.2f} s "
        f"(compiled once, then loaded from the disk cache in {cache_dir()})"
    )

    stream = bandwidth_kernel()
    results = []
    for tree in args.trees:
        shapes = TREES[tree]()
        elements = sum(int(np.prod(s)) for s in shapes.values())
        print(f"\n== {tree}: {len(shapes)} tensors, {elements / 1e6:.1f}M parameters (float32)")
        # allocated and filled like the candidates' arrays (np.zeros' calloc pages behave differently)
        buffers = [np.full(elements, 0.5, np.float32) for _ in range(4)]
        stream(*buffers)

        def bound_step():
            stream(*buffers)

        bound = statistics.median(_timed(bound_step) for _ in range(5))
        print(
            f"   bandwidth: {28 * elements / bound / 1e9:.1f} GB/s -> AdamW bound {bound * 1e3:.2f} ms "
            f"(SGD momentum moves 20 B/element: bound {bound * 20 / 28 * 1e3:.2f} ms); "
            "the bound is re-timed in every round, interleaved with the candidates"
        )
        muon_bound = None
        if "muon" in args.optimizers:
            muon_bound = {lib: matmul_runner(shapes, lib) for lib in ("numpy", "torch") if lib in libraries}
            print(
                "   Muon matrix products alone (5 Newton-Schulz steps, same-shape matrices batched): re-timed "
                "in every round (numpy matmul on stacks; torch.bmm for torch)"
            )
        jax_muon = None
        if "muon" in args.optimizers and "jax" in libraries:
            jax_muon = jax_compile_times(tree, args.compile_limit)
            for name, found in jax_muon.items():
                if found is None:
                    continue
                if "compile" not in found:
                    text = f"compile not done after {found['stopped']:.0f} s (stopped)"
                else:
                    text = f"compile {found['compile']:.1f} s (trace, XLA, first step)"
                    text += f"; from the cache {found['cached']:.1f} s" if "cached" in found else ""
                    text += f"; step {found['step'] * 1e3:.1f} ms" if "step" in found else ""
                print(f"   muon  {name:<30} {text}  [fresh process]")
                COMPILES.append({"tree": tree, "candidate": name} | found)
        for kind in args.optimizers:
            # interleaved within a family of libraries (all of them at once would not fit in
            # memory for the 124M tree); families share the bound measured above
            for family in (["numpy", "torch"], ["jax"], ["mlx"]):
                present = [lib for lib in family if lib in libraries]
                if not present:
                    continue
                candidates = treeopt_candidates(kind, shapes, present)
                if not args.no_peers:
                    candidates.update(peer_candidates(kind, shapes, present))
                if kind == "muon" and family == ["jax"]:  # only what compiled within the limit
                    compiled = {k for k, found in (jax_muon or {}).items() if found and "compile" in found}
                    candidates = {k: v for k, v in candidates.items() if k in compiled}
                if tree == "gpt2" and not args.all:
                    candidates = {k: v for k, v in candidates.items() if not k.endswith("eager")}
                results += _run(tree, kind, candidates, rounds, bound_step, muon_bound, elements)
                gc.collect()
        del buffers
        gc.collect()
    if FIRST_STEPS:
        print("\n== first steps (a fresh optimizer: planning, compiling or loading kernels from the disk cache)")
        for name, kind, first, second in FIRST_STEPS:
            print(f"   {kind:<5} {name:<16} step 1 {first * 1e3:9.1f} ms   step 2 {second * 1e3:9.1f} ms")
    if "numpy" in libraries:
        print(
            "\n== cached start (new processes, numba's disk cache warm: import treeopt and AdamW's first 8 steps "
            "on the 10M tree; median of 5 processes)"
        )
        runs = [fresh_process(_CHILD_START.format(shapes=small_shapes()), 300) for _ in range(5)]
        runs = [found for found in runs if found and "step8" in found]
        if runs:
            found = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            later = " ".join(f"{found[f'step{k}'] * 1e3:.0f}" for k in range(2, 9))
            print(
                f"   import + step 1 {(found['import'] + found['step1']) * 1e3:.0f} ms (import treeopt "
                f"{found['import'] * 1e3:.0f} ms, step 1 {found['step1'] * 1e3:.0f} ms: the engine's step, then "
                f"numba's loop loaded from the disk cache); steps 2-8 {later} ms"
            )
            CACHED_START.update(found)
    print(
        "\n== GPU rows (CUDA: treeopt's Triton runner against torch.optim.AdamW(fused=True) on GPT-2 small; "
        "Muon batched in bfloat16, replayed as a CUDA graph, against torch.optim.Muon; first steps of new "
        "processes): bash benchmarks/gpu_check.sh on a CUDA machine (docs/performance.md#gpu)"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {
                    "cpu": cpu_name(),
                    "load": os.getloadavg(),
                    "numba": numba.__version__,
                    "threads": kernels.get_num_threads(),
                    "results": results,
                    "first_steps": FIRST_STEPS,
                    "jax_muon_compiles": COMPILES,
                    "cached_start": CACHED_START,
                },
                f,
                indent=2,
            )
        print(f"\nwrote {args.json}")


def _installed(name):
    import importlib.util

    return importlib.util.find_spec({"mlx": "mlx.core"}.get(name, name)) is not None


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _run(tree, kind, candidates, rounds, bound_step, muon_bound, elements):
    traffic = {"adamw": 1.0, "sgd": 20 / 28, "muon": 1.0}[kind]
    runners, memory = {"(bandwidth bound)": bound_step}, {"(bandwidth bound)": 0}
    if kind == "muon" and muon_bound:  # the matrix products alone, re-timed in every round
        for lib, product_step in muon_bound.items():
            runners[f"(matmul {lib})"], memory[f"(matmul {lib})"] = product_step, 0
    for name, setup in candidates.items():
        try:
            runner = setup()
        except Exception as error:  # a peer that cannot run this case
            print(f"   {kind:<5} {name:<30} skipped: {type(error).__name__}: {str(error)[:80]}")
            continue
        if runner is None:
            continue
        with PeakMemory() as peak:
            runner()
        runners[name], memory[name] = runner, peak.added
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():  # interleaved: one step of each per round
            times[name].append(_timed(runner))
    bound = statistics.median(times.pop("(bandwidth bound)"))
    products = {
        name[len("(matmul ") : -1]: statistics.median(times.pop(name))
        for name in list(times)
        if name.startswith("(matmul ")
    }
    for lib, seconds in products.items():
        print(f"   {kind:<5} {'matrix products alone, ' + lib:<30} {seconds * 1e3:9.2f} ms  (batched, this round)")
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        row = {
            "tree": tree,
            "optimizer": kind,
            "candidate": name,
            "median_ms": median * 1e3,
            "bound_ms": bound * traffic * 1e3,
            "ratio_to_bound": median / (bound * traffic),
            "peak_added_mb": memory[name] / 2**20,
        }
        if products:  # torch's candidates against torch.bmm, the others against NumPy's matmul
            own = products.get("torch" if "torch" in name else "numpy", next(iter(products.values())))
            row["ratio_to_matmul"] = median / own
        rows.append(row)
        extra = f"  {row['ratio_to_matmul']:5.2f}x matmul" if "ratio_to_matmul" in row else ""
        extra += f"  (bound {bound * traffic * 1e3:.2f} ms this round)" if name == next(iter(times)) else ""
        print(
            f"   {kind:<5} {name:<30} {median * 1e3:9.2f} ms  {row['ratio_to_bound']:6.2f}x bound"
            f"  +{row['peak_added_mb']:7.1f} MB{extra}"
        )
    return rows


if __name__ == "__main__":
    main()
