"""Compact optimizer state (``state_dtype``): what it saves, what a step costs, what training gets.

    python benchmarks/precision.py                 # state bytes and step times on this CPU (~5 min)
    python benchmarks/precision.py --quick         # fewer rounds
    python benchmarks/precision.py --outcome --out results/precision-outcome.json
                                                   # the demo at each precision: 600 steps, 2 seeds (long)
    python benchmarks/precision.py --device cuda   # GPT-2 small's AdamW step on a GPU

*State*: bytes of optimizer state per parameter for AdamW and ``muon_adamw`` at each
``state_dtype``, on a 10M-parameter transformer tree whose embeddings and head are 40% of it
(the rest: hidden matrices, and norms), with the peers' bytes measured from their own state
after a step (bitsandbytes' AdamW8bit, torchao's AdamW8bit, where they install).

*Step*: one AdamW step on the same tree, timed in one process with every candidate
interleaved round by round (a busy machine slows all alike): treeopt at each precision on
NumPy arrays and on CPU torch tensors, torch's AdamW (``fused=True``), bitsandbytes'
AdamW8bit, torchao's AdamW8bit and optimi's AdamW. Medians, and ratios to treeopt's float32
step and to torch's fused step.

*Outcome*: the demo's byte-level GPT (``python -m treeopt.demo``'s model, data and schedules)
trained 600 steps with ``muon_adamw`` at each precision and with the demo's tuned AdamW in
float32, for seeds 0 and 1, one run at a time: final validation loss, its gap to float32's,
and the steps each run needs to reach tuned AdamW's final loss. Results are written to
``--out`` after every run, so an interrupted run keeps what it finished.

The peers are optional benchmark dependencies (``pip install -e ".[bench]"``); a missing one is
reported and skipped.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PRECISIONS = (None, "float32", "bfloat16", "int8")


# --------------------------------------------------------------------------------- the tree
def tree_shapes():
    """A transformer's parameters: embeddings and head 40% (vocab 8192, width 256), 8 blocks."""
    from step import small_shapes

    return small_shapes(d=256, layers=8, vocab=8192)


def arrays(shapes, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


def nested(flat):
    """``{"a.b": x}`` as ``{"a": {"b": x}}``, so that routing sees the model's paths."""
    out = {}
    for path, value in flat.items():
        node = out
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return out


# --------------------------------------------------------------------------------- state bytes
def state_rows(shapes):
    import treeopt

    count = sum(int(np.prod(s)) for s in shapes.values())
    rows = []
    for name, make in (
        ("AdamW", lambda p, d: treeopt.AdamW(1e-3, state_dtype=d)),
        ("muon_adamw", lambda p, d: treeopt.muon_adamw(p, state_dtype=d)),
    ):
        fp32 = None
        for precision in PRECISIONS:
            params = nested(arrays(shapes))
            opt = make(params, precision)
            total = sum(g.state_bytes for g in opt.plan(params).groups)
            fp32 = fp32 or total
            rows.append((f"treeopt {name}", precision or "None (float32)", total / count, total / fp32))
    for name, make in peers_of_state():
        try:
            total = measured_peer_bytes(make, shapes)
        except Exception as error:  # an optional peer that does not run here: say so
            rows.append((name, f"not measured ({type(error).__name__}: {str(error)[:60]})", float("nan"), float("nan")))
            continue
        rows.append((name, "", total / count, float("nan")))
    return rows


def peers_of_state():
    peers = []
    try:
        import bitsandbytes as bnb

        peers.append(("bitsandbytes AdamW8bit", lambda p: bnb.optim.AdamW8bit(p, lr=1e-3)))
    except Exception:
        pass
    try:
        from torchao.optim import AdamW8bit

        peers.append(("torchao AdamW8bit", lambda p: AdamW8bit(p, lr=1e-3)))
    except Exception:
        pass
    return peers


def measured_peer_bytes(make, shapes):
    import torch

    params = [torch.nn.Parameter(torch.from_numpy(a)) for a in arrays(shapes).values()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    opt.step()
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1:
                total += tensor_bytes(value)
    return total


def tensor_bytes(value):
    """Bytes of a tensor, or of a tensor subclass holding codes and scales (torchao)."""
    inner = getattr(value, "__tensor_flatten__", None)
    if inner is not None and type(value).__name__ != "Tensor":
        names, _ = value.__tensor_flatten__()
        return sum(tensor_bytes(getattr(value, n)) for n in names)
    return value.numel() * value.element_size()


# --------------------------------------------------------------------------------- step times
def step_candidates(shapes, quick):
    import torch

    import treeopt

    grads_np = arrays(shapes, seed=1, scale=1e-2)
    candidates = {}
    for library in ("numpy", "torch"):
        for precision in (None, "bfloat16", "int8"):
            params = arrays(shapes)
            grads = grads_np
            if library == "torch":
                params = {k: torch.from_numpy(v) for k, v in params.items()}
                grads = {k: torch.from_numpy(v) for k, v in grads_np.items()}
            opt = treeopt.AdamW(1e-3, state_dtype=precision)

            def step(opt=opt, params=params, grads=grads):
                opt.update(params, grads)

            step()
            step()  # planned and compiled
            candidates[f"treeopt {library} {precision or 'float32'}"] = step
    tensors = [torch.nn.Parameter(torch.from_numpy(a)) for a in arrays(shapes).values()]
    for p, g in zip(tensors, grads_np.values()):
        p.grad = torch.from_numpy(g.copy())
    peers = {"torch AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)}
    for name, make in peers_of_state():
        peers[name] = make
    try:
        import optimi

        peers["optimi AdamW"] = lambda p: optimi.AdamW(p, lr=1e-3)
    except Exception:
        pass
    for name, make in peers.items():
        try:
            copies = [torch.nn.Parameter(p.detach().clone()) for p in tensors]
            for c, p in zip(copies, tensors):
                c.grad = p.grad
            opt = make(copies)
            opt.step()
            opt.step()
            candidates[name] = opt.step
        except Exception as error:
            print(f"{name}: does not run here ({type(error).__name__}: {str(error)[:80]})")
    return candidates


def time_rounds(candidates, rounds):
    """Per candidate: the median wall time of a step, and the median CPU time of the process
    during it (every thread's; on a busy machine the steady figure: it does not count the time
    the process waited for a core)."""
    times = {name: [] for name in candidates}
    cpu = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, step in candidates.items():
            began, began_cpu = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - began)
            cpu[name].append(time.process_time() - began_cpu)
    return {name: statistics.median(ts) for name, ts in times.items()}, {
        name: statistics.median(ts) for name, ts in cpu.items()
    }


# --------------------------------------------------------------------------------- outcome
def outcome(out, seeds=(0, 1), steps=600, threads=None):
    """The demo at each precision; results written to ``out`` after every run."""
    import torch

    import treeopt.torch
    from treeopt.demo import setups
    from treeopt.demo.harness import cli, training
    from treeopt.precision import state_precision

    if threads:
        torch.set_num_threads(threads)
    results = json.load(open(out)) if out and os.path.exists(out) else {"runs": {}}
    runs = [  # seed by seed: an interrupted run has whole comparisons
        (setup, precision, seed)
        for seed in seeds
        for setup, precision in (
            ("AdamW", None),
            ("muon_adamw", None),
            ("muon_adamw", "bfloat16"),
            ("muon_adamw", "int8"),
        )
    ]
    data = training.Data(cli.CONTEXT, cli.BATCH_SIZE)
    for setup, precision, seed in runs:
        key = f"{setup}/{precision or 'float32'}/{seed}"
        if key in results["runs"]:
            continue
        model = training.build_model(seed, training.gpt.Config(context=cli.CONTEXT))
        routing = setups.routing(setup, steps, setups.Hyper())
        for child in routing.optimizers:  # the demo's optimizer, its state stored at this precision
            child.store.precision = state_precision(precision, type(child).__name__)
        optimizer = treeopt.torch.Optimizer(model, routing)
        began = time.perf_counter()
        curve, seconds = training.train(model, optimizer, data, steps, seed)
        results["runs"][key] = {
            "steps": curve.steps,
            "val_loss": curve.val_loss,
            "seconds": seconds[0],
            "wall": time.perf_counter() - began,
        }
        print(f"{key}: final validation loss {curve.val_loss[-1]:.4f} ({seconds[0]:.0f} s)", flush=True)
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(out + ".tmp", out)
    print_outcome(results, seeds)
    return results


def print_outcome(results, seeds):
    from treeopt.demo.harness.training import Curve

    runs = results["runs"]
    print("\nmuon_adamw on the demo's GPT, 600 steps: final validation loss (nats) and steps to tuned AdamW's final")
    print(f"{'state_dtype':<12} {'seed':>4} {'final':>8} {'vs float32':>11} {'steps to AdamW':>15} {'vs float32':>11}")
    for precision in ("float32", "bfloat16", "int8"):
        for seed in seeds:
            run, base, adamw = (
                runs.get(f"muon_adamw/{precision}/{seed}"),
                runs.get(f"muon_adamw/float32/{seed}"),
                runs.get(f"AdamW/float32/{seed}"),
            )
            if run is None:
                continue
            final = run["val_loss"][-1]
            gap = final - base["val_loss"][-1] if base else float("nan")
            reach = base_reach = None
            if adamw:
                target = adamw["val_loss"][-1]
                reach = _reach(Curve(steps=run["steps"], val_loss=run["val_loss"]), target)
                base_reach = _reach(Curve(steps=base["steps"], val_loss=base["val_loss"]), target) if base else None
            ratio = reach / base_reach if reach and base_reach else float("nan")
            print(
                f"{precision:<12} {seed:>4} {final:>8.4f} {gap:>+11.4f} "
                f"{reach if reach is not None else float('nan'):>15.0f} {ratio:>10.3f}x"
            )


def _reach(curve, target):
    found = None
    for i, loss in enumerate(curve.val_loss):
        if loss <= target:
            if i == 0:
                return 0.0
            t = (curve.val_loss[i - 1] - target) / (curve.val_loss[i - 1] - loss)
            return curve.steps[i - 1] + t * (curve.steps[i] - curve.steps[i - 1])
    return found


# --------------------------------------------------------------------------------- GPU
def gpu_rows(rounds):
    """GPT-2 small's AdamW step on CUDA: treeopt at each precision against bitsandbytes'
    AdamW8bit and torch's fused AdamW (CUDA events, medians)."""
    import torch

    import treeopt
    from step import gpt2_shapes

    device = torch.device("cuda")
    shapes = gpt2_shapes()
    host = arrays(shapes, scale=0.02)
    grads = {k: torch.randn(s, device=device) * 1e-2 for k, s in shapes.items()}
    candidates = {}
    for precision in (None, "bfloat16", "int8"):
        params = {k: torch.from_numpy(v).to(device) for k, v in host.items()}
        opt = treeopt.AdamW(1e-3, state_dtype=precision)

        def step(opt=opt, params=params):
            opt.update(params, grads)

        candidates[f"treeopt {precision or 'float32'}"] = step
    tensors = [torch.nn.Parameter(torch.from_numpy(v).to(device)) for v in host.values()]
    for p, g in zip(tensors, grads.values()):
        p.grad = g
    peers = {"torch AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)}
    peers.update(dict(peers_of_state()))
    for name, make in peers.items():
        copies = [torch.nn.Parameter(p.detach().clone()) for p in tensors]
        for c, p in zip(copies, tensors):
            c.grad = p.grad
        candidates[name] = make(copies).step
    for step in candidates.values():  # compile, warm up
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, step in candidates.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                step()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / 5)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\nGPT-2 small (124M), AdamW step on {torch.cuda.get_device_name()}: median of {rounds} rounds of 5")
    bnb = medians.get("bitsandbytes AdamW8bit")
    for name, ms in medians.items():
        vs = f"{ms / bnb:.2f}x bitsandbytes" if bnb else ""
        print(f"{name:<26} {ms:8.3f} ms  {ms / medians['treeopt float32']:.2f}x float32  {vs}")
    return medians


# --------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--outcome", action="store_true", help="the demo at each precision (long)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--threads", type=int, default=None, help="threads of the step (numba, torch) or of the outcome runs"
    )
    parser.add_argument("--out", default=None, help="JSON results (the outcome's: written after every run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.outcome:
        outcome(args.out, tuple(args.seeds), args.steps, args.threads)
        return
    if args.device == "cuda":
        gpu_rows(args.rounds or 20)
        return
    from step import cpu_name

    shapes = tree_shapes()
    count = sum(int(np.prod(s)) for s in shapes.values())
    load = os.getloadavg()[0]
    print(f"{cpu_name()}; load average {load:.1f}; tree: {count / 1e6:.1f}M parameters in {len(shapes)} tensors")
    print("\nOptimizer state, bytes per parameter")
    print(f"{'optimizer':<26} {'state_dtype':<16} {'bytes/param':>11} {'vs float32':>10}")
    for name, precision, per, ratio in state_rows(shapes):
        print(f"{name:<26} {precision:<16} {per:>11.2f} {ratio:>10.3f}")
    rounds = args.rounds or (7 if args.quick else 25)
    if args.threads:  # numba's loops and torch's operations, alike
        import numba
        import torch

        numba.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    medians, cpu = time_rounds(step_candidates(shapes, args.quick), rounds)
    base, fused = medians["treeopt numpy float32"], medians.get("torch AdamW fused")
    base_cpu = cpu["treeopt numpy float32"]
    threads = f"{args.threads} thread(s)" if args.threads else "default threads"
    print(f"\nAdamW step, median of {rounds} interleaved rounds, {threads}; load average now {os.getloadavg()[0]:.1f}")
    print(
        f"{'candidate':<26} {'wall ms':>8} {'vs treeopt fp32':>16} {'vs torch fused':>15} {'CPU ms':>8} {'CPU vs fp32':>12}"
    )
    for name, seconds in medians.items():
        vs_fused = f"{seconds / fused:>14.2f}x" if fused else ""
        print(
            f"{name:<26} {seconds * 1e3:>8.2f} {seconds / base:>15.2f}x {vs_fused} "
            f"{cpu[name] * 1e3:>8.2f} {cpu[name] / base_cpu:>11.2f}x"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"cpu": cpu_name(), "load": load, "threads": args.threads, "step_seconds": medians, "cpu_seconds": cpu},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
