"""The GPU rows of ``benchmarks/step.py``: one optimizer step on a CUDA device, against torch's own.

    python benchmarks/gpu.py                       # GPT-2 small on the first CUDA device
    python benchmarks/gpu.py --json gpu.json
    python benchmarks/gpu.py --device cpu --scale 16 --rounds 2   # a dry run of the script on CPU
    python benchmarks/gpu.py --first-step           # the first steps of a new process, cold and warm caches

Each candidate updates its own copy of GPT-2 small's parameters (124M in 148 tensors, float32)
through the interface a torch user calls: ``nn.Parameter``s with ``.grad`` set, then
``optimizer.step()``. Rows:

- AdamW: treeopt (``treeopt.torch.Optimizer``; on CUDA its torch.compile runner: the rule's own
  ``update`` over the group's tensors as one Inductor-fused step) against
  ``torch.optim.AdamW(fused=True)`` and ``foreach=True``, and against the bandwidth bound: 28
  bytes per parameter at the device-to-device copy rate measured in the same run.
- Muon on the 48 hidden matrices: treeopt's ``Muon`` (same-shape matrices stacked, one batched
  product per Newton-Schulz term) with Newton-Schulz in bfloat16 and in float32, against
  ``torch.optim.Muon``, which always runs Newton-Schulz in bfloat16 (matrix by matrix).
- The routed model: ``treeopt.muon_adamw`` on all 148 tensors against the torch way,
  ``torch.optim.Muon`` on the hidden matrices plus a fused ``AdamW`` on the rest.

Steps are timed in blocks between ``torch.cuda.synchronize()`` calls, candidates interleaved
block by block; the table gives the median per step, and the first two steps (planning,
building kernels) apart. ``host ms`` is the time the host takes to queue one step (a lone step
costs at least that); ``in loop`` the step's cost behind other queued device work.

``--first-step`` times, in fresh processes, treeopt's first two steps on GPT-2 small (the
first takes the general engine, the second plans the step and builds its kernels): with empty
kernel caches (``TRITON_CACHE_DIR``, ``TREEOPT_CACHE_DIR`` in a new folder) and again with the
caches that run filled.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import math
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import cpu_name, gpt2_shapes, is_hidden  # noqa: E402

import treeopt as optim  # noqa: E402
import treeopt.torch  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_copy(shapes, device, scale, seed=0):
    """``[(name, Parameter)]`` with ``.grad`` set, the same values for every candidate."""
    generator = torch.Generator(device).manual_seed(seed)
    named = []
    for name, shape in shapes.items():
        shape = tuple(max(1, s // scale) for s in shape)
        p = torch.nn.Parameter(0.02 * torch.randn(shape, generator=generator, device=device))
        p.grad = 1e-3 * torch.randn(shape, generator=generator, device=device)
        named.append((name, p))
    return named


def treeopt_step(named, optimizer):
    opt = treeopt.torch.Optimizer(named, optimizer)
    return opt.step


class TorchOptimizers:
    """torch's optimizers for the same job, stepped together: AdamW (``"fused"`` or
    ``"foreach"``), Muon on the hidden matrices (``"muon"``), or Muon on those and fused AdamW
    on the rest (``"muon+adamw"``)."""

    def __init__(self, named, mode, hidden=is_hidden):
        matrices = [p for n, p in named if hidden(n, tuple(p.shape))]
        rest = [p for n, p in named if not hidden(n, tuple(p.shape))]
        if mode in ("fused", "foreach"):
            self.optimizers = [torch.optim.AdamW([p for _, p in named], lr=1e-3, weight_decay=0.01, **{mode: True})]
        elif mode == "muon":
            self.optimizers = [torch.optim.Muon(matrices, lr=0.02, weight_decay=0.01)]
        else:
            self.optimizers = [
                torch.optim.Muon(matrices, lr=0.02, weight_decay=0.01),
                torch.optim.AdamW(rest, lr=3e-4, weight_decay=0.01, fused=True),
            ]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def torch_step(named, mode):
    return TorchOptimizers(named, mode).step


def hidden_only(named):
    return [(n, p) for n, p in named if is_hidden(n, tuple(p.shape))]


def candidates(has_muon):
    """``{row: (kind, setup(named) -> step)}``: every setup builds its optimizer over ``named``."""
    rows = {
        "treeopt AdamW": ("adamw", lambda named: treeopt_step(named, optim.AdamW(1e-3, weight_decay=0.01))),
        "torch AdamW fused": ("adamw", lambda named: torch_step(named, "fused")),
        "torch AdamW foreach": ("adamw", lambda named: torch_step(named, "foreach")),
    }
    muon = {"decoupled_weight_decay": True, "weight_decay": 0.01}
    rows["treeopt Muon (NS in bfloat16)"] = (
        "muon",
        lambda named: treeopt_step(hidden_only(named), optim.Muon(0.02, ns_dtype="bfloat16", **muon)),
    )
    rows["treeopt Muon (NS in float32)"] = (
        "muon",
        lambda named: treeopt_step(hidden_only(named), optim.Muon(0.02, **muon)),
    )
    if has_muon:
        rows["torch.optim.Muon (NS in bfloat16)"] = ("muon", lambda named: torch_step(hidden_only(named), "muon"))
    routed = optim.muon_adamw(muon_lr=0.02, adamw_lr=3e-4, layout="out_in", ns_dtype="bfloat16")
    rows["treeopt muon_adamw (NS in bfloat16)"] = ("routed", lambda named: treeopt_step(named, routed))
    if has_muon:
        rows["torch Muon + AdamW fused"] = ("routed", lambda named: torch_step(named, "muon+adamw"))
    return rows


def training_rows(device, scale, batch, steps, rounds):
    """Whole training iterations (forward, backward, step; bfloat16 autocast on CUDA) of a
    GPT-2-small-sized model, the demo's GPT (``treeopt.demo.gpt``: 12 layers, width 768,
    context 1024, vocabulary 50,304, untied head), with each optimizer: ms per iteration."""
    from treeopt.demo.gpt import Config, build

    config = Config(vocab=50304 // scale, context=1024 // scale, width=768 // scale, layers=12, heads=12)
    generator = torch.Generator(device).manual_seed(0)
    tokens = torch.randint(0, config.vocab, (batch, config.context + 1), generator=generator, device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def in_blocks(name, shape):  # the hidden matrices of treeopt.demo.gpt
        return name.startswith("blocks.") and len(shape) == 2

    makers = {
        "treeopt AdamW": lambda m: treeopt.torch.Optimizer(m, optim.AdamW(1e-3, weight_decay=0.01)),
        "torch AdamW fused": lambda m: TorchOptimizers(list(m.named_parameters()), "fused"),
        "treeopt muon_adamw (NS in bfloat16)": lambda m: treeopt.torch.Optimizer(
            m, optim.muon_adamw(muon_lr=0.02, adamw_lr=3e-4, ns_dtype="bfloat16")
        ),
    }
    if hasattr(torch.optim, "Muon"):
        makers["torch Muon + AdamW fused"] = lambda m: TorchOptimizers(
            list(m.named_parameters()), "muon+adamw", hidden=in_blocks
        )
    iterations, first = {}, {}
    for row, make in makers.items():
        model = build(0, config).to(device)
        opt = make(model)

        def iteration(model=model, opt=opt):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model.loss(inputs, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        start = time.perf_counter()
        for _ in range(2):  # the second step compiles treeopt's step
            iteration()
        sync(device)
        first[row] = time.perf_counter() - start
        iterations[row] = iteration
        print(f"  ready (training) {row:<36} first two iterations {first[row]:7.2f} s", flush=True)
    samples = {row: [] for row in iterations}
    for _ in range(rounds):
        for row, iteration in iterations.items():
            samples[row].append(timed_block(iteration, steps, device)[0])
    peers = {"treeopt AdamW": "torch AdamW fused", "treeopt muon_adamw (NS in bfloat16)": "torch Muon + AdamW fused"}
    medians = {row: statistics.median(s) for row, s in samples.items()}
    print(f"\n{'training iteration, batch ' + str(batch) + ' x ' + str(config.context):<42} {'ms':>9} {'x peer':>7}")
    results = []
    for row, median in medians.items():
        peer = medians.get(peers.get(row, row))
        results.append(
            {"row": row, "ms": median * 1e3, "x_peer": median / peer if peer else None, "first_s": first[row]}
        )
        print(f"{row:<42} {median * 1e3:9.2f} {median / peer if peer else 1:7.3f}")
    return results


def copy_bandwidth(device, gib=1.0, repeats=10):
    """Bytes read plus written per second by a device-to-device copy."""
    n = int(gib * 2**30 // 4)
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    del src, dst
    return 2 * n * 4 / seconds


def timed_block(step, steps, device, busy=None):
    """Seconds per step, and of them the host's: the time to queue the steps (the same when the
    host, not the device, is the bottleneck). ``busy``: queued before each step, as a training
    loop queues the backward pass; its own time is subtracted by the caller."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        if busy:
            busy()
        step()
    queued = time.perf_counter()
    sync(device)
    return (time.perf_counter() - start) / steps, (queued - start) / steps


def device_busy(device, ms=3.0):
    """A kernel that keeps the device busy for about ``ms`` (the backward pass of a training
    loop, during which the host queues the optimizer's step): ``torch.cuda._sleep``."""
    if device.type != "cuda":
        return None
    torch.cuda._sleep(1000)
    sync(device)
    start = time.perf_counter()
    torch.cuda._sleep(10**7)
    sync(device)
    cycles = int(10**7 * ms / ((time.perf_counter() - start) * 1e3))
    return lambda: torch.cuda._sleep(cycles)


def waits_for_device(step):
    """Where a step synchronises with the device (``None``: nowhere), found by torch's sync
    debug mode: treeopt's frames of the first synchronising call."""
    import traceback

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return None
    except RuntimeError as error:
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "treeopt" in f.filename]
        return (
            f"{error}"[:120]
            + " at "
            + " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[::-1][:4])
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")


def profile(step, path, steps=3):
    """torch.profiler's table of ``steps`` steps (host and device time by operator) into ``path``."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
        f.write("\n\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


FIRST_STEPS = """
import sys, time
start = time.perf_counter()
import torch
sys.path.insert(0, {folder!r})
import treeopt as optim
import treeopt.torch
from gpu import model_copy
from step import gpt2_shapes
named = model_copy(gpt2_shapes(), torch.device({device!r}), {scale})
torch.cuda.synchronize() if torch.cuda.is_available() else None
ready = time.perf_counter()
opt = treeopt.torch.Optimizer(named, {make})
opt.step()
torch.cuda.synchronize() if torch.cuda.is_available() else None
first = time.perf_counter()
opt.step()
torch.cuda.synchronize() if torch.cuda.is_available() else None
print("FIRST", first - ready, time.perf_counter() - first, ready - start)
"""

FIRST_STEP_OPTIMIZERS = {
    "AdamW": "optim.AdamW(1e-3, weight_decay=0.01)",
    "muon_adamw (NS in bfloat16)": "optim.muon_adamw(muon_lr=0.02, adamw_lr=3e-4, ns_dtype='bfloat16')",
}


def first_steps(device, scale, limit=240):
    """The first two steps of a new process, with empty and with filled kernel caches: rows."""
    folder = os.path.dirname(os.path.abspath(__file__))
    caches = tempfile.mkdtemp(prefix="treeopt-first-step-")
    environment = dict(os.environ, TRITON_CACHE_DIR=os.path.join(caches, "triton"), TREEOPT_CACHE_DIR=caches)
    rows = []
    print(f"\n{'first steps of a new process (GPT-2 small)':<46} {'cache':>6} {'step 1 s':>9} {'step 2 s':>9}")
    try:
        for name, make in FIRST_STEP_OPTIMIZERS.items():
            for cache in ("cold", "warm"):
                source = FIRST_STEPS.format(folder=folder, device=str(device), scale=scale, make=make)
                try:
                    done = subprocess.run(
                        [sys.executable, "-c", source], capture_output=True, text=True, timeout=limit, env=environment
                    )
                    line = [x for x in done.stdout.splitlines() if x.startswith("FIRST")]
                    if not line:
                        raise RuntimeError((done.stderr or done.stdout).strip().splitlines()[-1:])
                    step1, step2, _ = (float(x) for x in line[0].split()[1:])
                except (subprocess.TimeoutExpired, RuntimeError) as error:
                    print(f"treeopt {name:<38} {cache:>6} failed: {error}"[:200], flush=True)
                    continue
                rows.append({"row": f"treeopt {name}", "cache": cache, "step1_s": step1, "step2_s": step2})
                print(f"treeopt {name:<38} {cache:>6} {step1:9.2f} {step2:9.2f}", flush=True)
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=int, default=1, help="divide every dimension by this (a dry run)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--only", default="", help="comma-separated kinds: adamw,muon,routed (none: only --train)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--train", type=int, default=0, metavar="BATCH", help="also time training iterations")
    parser.add_argument("--profile", default=None, help="a folder for torch.profiler tables of treeopt's rows")
    parser.add_argument("--first-step", action="store_true", help="only the first steps of new processes")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: the GPU rows need one (--device cpu for a dry run)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    # the working tree, not only the commit: a copy of a tree with changes says "-dirty"
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    print(f"device {name}; torch {torch.__version__}; treeopt {commit}; scale 1/{args.scale}", flush=True)

    if args.first_step:
        rows = first_steps(device, args.scale)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"device": name, "torch": torch.__version__, "treeopt": commit, "first_steps": rows}, f, indent=2
                )
        return

    shapes = gpt2_shapes()
    elements = sum(math.prod(max(1, s // args.scale) for s in shape) for shape in shapes.values())
    bandwidth = copy_bandwidth(device, gib=min(1.0, 4 * elements * 8 / 2**30))
    bound = 28 * elements / bandwidth
    print(f"{elements / 1e6:.1f}M parameters; copy {bandwidth / 1e9:.0f} GB/s; AdamW bound {bound * 1e3:.3f} ms")

    kinds = set(args.only.split(",")) if args.only else {"adamw", "muon", "routed"}
    rows = {k: v for k, v in candidates(hasattr(torch.optim, "Muon")).items() if v[0] in kinds}
    steps, first, failed, waits = {}, {}, {}, {}
    for row, (_kind, setup) in rows.items():
        try:
            named = model_copy(shapes, device, args.scale)
            step = setup(named)
            times = []
            for _ in range(2):
                sync(device)
                start = time.perf_counter()
                step()
                sync(device)
                times.append(time.perf_counter() - start)
            steps[row], first[row] = step, times
            print(f"  ready {row:<40} step 1 {times[0]:8.2f} s, step 2 {times[1] * 1e3:8.2f} ms", flush=True)
            if device.type == "cuda" and row.startswith("treeopt"):
                waits[row] = waits_for_device(step)
                print(f"        waits for the device: {waits[row] or 'never'}", flush=True)
                if args.profile:
                    os.makedirs(args.profile, exist_ok=True)
                    profile(step, os.path.join(args.profile, "".join(c if c.isalnum() else "_" for c in row) + ".txt"))
        except Exception as error:  # a candidate that cannot run here is reported, not fatal
            failed[row] = f"{type(error).__name__}: {error}"[:300]
            print(f"  FAILED {row}: {failed[row]}", flush=True)

    samples = {row: [] for row in steps}
    busy = device_busy(device)
    in_loop = {row: [] for row in steps}
    for _ in range(args.rounds):
        for row, step in steps.items():
            samples[row].append(timed_block(step, args.steps, device))
        if busy:
            alone, _ = timed_block(busy, args.steps, device)
            for row, step in steps.items():
                in_loop[row].append(timed_block(step, args.steps, device, busy)[0] - alone)
    results = []
    peers = {
        "adamw": "torch AdamW fused",
        "muon": "torch.optim.Muon (NS in bfloat16)",
        "routed": "torch Muon + AdamW fused",
    }
    medians = {row: statistics.median(t for t, _ in s) for row, s in samples.items()}
    hosts = {row: statistics.median(h for _, h in s) for row, s in samples.items()}
    loops = {row: statistics.median(s) for row, s in in_loop.items() if s}
    print(
        f"\n{'row':<42} {'ms/step':>9} {'x peer':>7} {'x bound':>8} {'host ms':>8} {'in loop':>8} {'x peer':>7}"
        "\n(in loop: the step queued behind 3 ms of other device work, as after a backward pass; that work's own time"
        " subtracted)"
    )
    for row, median in medians.items():
        kind = rows[row][0]
        peer = medians.get(peers[kind])
        result = {
            "row": row,
            "kind": kind,
            "ms": median * 1e3,
            "x_peer": median / peer if peer else None,
            "x_bound": median / bound if kind == "adamw" else None,
            "first_step_s": first[row][0],
            "second_step_ms": first[row][1] * 1e3,
            "host_ms": hosts[row] * 1e3,
            "in_loop_ms": loops[row] * 1e3 if row in loops else None,
            "in_loop_x_peer": loops[row] / loops[peers[kind]] if row in loops and peers[kind] in loops else None,
            "spread_ms": [min(t for t, _ in samples[row]) * 1e3, max(t for t, _ in samples[row]) * 1e3],
            "waits_for_device": waits.get(row),
        }
        results.append(result)
        x_peer = f"{result['x_peer']:7.2f}" if peer else "      -"
        x_bound = f"{result['x_bound']:8.2f}" if result["x_bound"] else "       -"
        loop = (
            f"{result['in_loop_ms']:8.3f} {result['in_loop_x_peer'] or 0:7.2f}"
            if result["in_loop_ms"] is not None
            else ""
        )
        print(f"{row:<42} {median * 1e3:9.3f} {x_peer} {x_bound} {hosts[row] * 1e3:8.3f} {loop}")
    training = training_rows(device, args.scale, args.train, 5, args.rounds) if args.train else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": name,
                    "torch": torch.__version__,
                    "treeopt": commit,
                    "scale": args.scale,
                    "copy_bytes_per_s": bandwidth,
                    "adamw_bound_ms": bound * 1e3,
                    "results": results,
                    "failed": failed,
                    "training": training,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
