"""treeopt on several ranks: memory, Newton-Schulz work, traffic and step time per mode.

    python benchmarks/distributed.py [--worlds 1 2 4] [--modes zero1 fsdp2 replicated] [--steps 2]

The GPT-2 small tree (124M parameters, 148 tensors, built directly: no model, no download)
under ``optim.muon_adamw()`` (48 hidden matrices to Muon, the rest to AdamW), on W forked CPU
ranks with gloo and one thread each. Every rank gets the same gradients, as DDP would give
them (DDP's own all-reduce is not counted: it is the same in every mode). Per world and mode:

- optimizer state bytes per rank (max, mean) against total/W;
- Newton-Schulz GFLOP per rank per step (max/mean);
- bytes each rank sends per step and collectives per step, against the ideal of the mode
  (replicated: nothing; zero1: an all-gather of the new values, (W-1)/W x params per rank;
  fsdp2: each rank's rows of each Muon matrix's direction (after the momentum, computed on the
  rows) to the matrix's owner, and the rows of the orthogonalised direction back, 2(W-1)/W^2 x M);
- the optimizer step's median time (max over ranks), only where ranks <= cores;
- whether the parameters after the steps equal world 1's, bit for bit.
"""

import argparse
import hashlib
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")  # forking after GNU OpenMP is unsafe
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # ranks share the cores: no spinning threads

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import TREES  # noqa: E402

import treeopt as optim  # noqa: E402
import treeopt.torch  # noqa: E402


def rank_main(rank, world, mode, steps, folder, tree):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world, timeout=timedelta(seconds=1200)
    )
    generator = torch.Generator().manual_seed(0)
    params = [(n, torch.nn.Parameter(torch.randn(s, generator=generator) * 0.02)) for n, s in TREES[tree]().items()]
    grads = {n: torch.randn(s, generator=generator) * 1e-3 for n, s in TREES[tree]().items()}
    if mode == "fsdp2":  # what fully_shard makes of them: Shard(0) DTensors, gradients alike
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        params = [(n, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))) for n, p in params]
        grads = {n: distribute_tensor(g, mesh, [Shard(0)]) for n, g in grads.items()}
    sharding = "zero1" if mode == "zero1" else None
    opt = treeopt.torch.Optimizer(params, optim.muon_adamw(), sharding=sharding if world > 1 else None)
    import treeopt.rules.muon as muon_rule

    ns_flops = []
    original = muon_rule.newton_schulz
    from treeopt.distributed.ownership import newton_schulz_flops

    def counted(x, ns_steps, *rest):  # x: a matrix, or a stack of them (leading axes)
        ns_flops.append(math.prod(x.shape[:-2]) * newton_schulz_flops(tuple(x.shape[-2:]), ns_steps))
        return original(x, ns_steps, *rest)

    muon_rule.newton_schulz = counted
    comm = getattr(opt._distributed, "comm", None)
    calls_before, sent_before = (comm.calls, comm.sent_bytes) if comm else (0, 0)  # start-up checks apart
    times = []
    for step in range(steps):
        for name, p in params:
            p.grad = grads[name]
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    state_bytes = sum(
        v.numel() * v.element_size()
        for _, _, child in opt.optimizer.groups()
        for _, slots in child.store.items()
        for v in slots.values()
    )
    digest = hashlib.sha256()
    for _, p in params:
        digest.update((p.full_tensor() if mode == "fsdp2" else p).detach().numpy().tobytes())
    result = {
        "state_bytes": state_bytes,
        "ns_gflop": sum(ns_flops) / steps / 1e9,
        "sent": ((comm.sent_bytes if comm else 0) - sent_before) / steps,
        "calls": (comm.calls if comm else 0) - calls_before,
        "time": statistics.median(times[1:]) if steps > 1 else times[0],
        "digest": digest.hexdigest(),
        "param_bytes": sum(p.numel() * p.element_size() for _, p in params),
        "muon": sum(1 for n, _ in params if opt.optimizer.route(n) == 0),
        "muon_bytes": sum(p.numel() * p.element_size() for n, p in params if opt.optimizer.route(n) == 0),
    }
    torch.save(result, os.path.join(folder, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run(world, mode, steps, tree):
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(rank_main, args=(world, mode, steps, folder, tree), nprocs=world, start_method="fork")
        return [torch.load(os.path.join(folder, f"{r}.pt")) for r in range(world)]


def mib(n):
    return f"{n / 2**20:8.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=["zero1", "fsdp2", "replicated"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tree", default="gpt2", choices=sorted(TREES), help="gpt2 (124M); small: a quick check")
    args = parser.parse_args()
    cores = os.cpu_count()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(
        f"{args.tree} tree, optim.muon_adamw(), float32, gloo, 1 thread per rank; {cores} cores ({cpu}); "
        f"torch {torch.__version__}; other work may share the machine: times are indicative only"
    )
    baseline = run(1, None, args.steps, args.tree)[0]
    total = baseline["state_bytes"]
    print(
        f"world 1: {baseline['muon']} Muon matrices, params {mib(baseline['param_bytes'])} MiB, "
        f"state {mib(total)} MiB, Newton-Schulz {baseline['ns_gflop']:.1f} GFLOP/step, "
        f"step {baseline['time'] * 1e3:.0f} ms",
        flush=True,
    )
    header = (
        f"{'W':>2} {'mode':<10} {'state/rank MiB max':>18} {'mean':>8} {'max/(S/W)':>9} "
        f"{'NS GFLOP max':>12} {'max/mean':>8} {'sent MiB/step':>13} {'vs ideal':>8} {'coll/step':>9} "
        f"{'step ms':>8} {'vs W=1':>6} {'same as W=1':>11}"
    )
    print(header, flush=True)
    for world in args.worlds:
        for mode in args.modes:
            if world == 1 and mode != args.modes[0]:
                continue
            results = baseline and [baseline] if world == 1 else run(world, mode, args.steps, args.tree)
            state = [r["state_bytes"] for r in results]
            ns = [r["ns_gflop"] for r in results]
            sent = max(r["sent"] for r in results)
            ideal = {
                "zero1": (world - 1) / world * baseline["param_bytes"],  # all-gather of the new values
                "fsdp2": 2 * (world - 1) / world**2 * baseline["muon_bytes"],
            }.get(mode, 0)  # rows of the direction there, of the orthogonalised direction back
            calls = max(r["calls"] for r in results) / args.steps
            step = max(r["time"] for r in results)
            timing = f"{step * 1e3:8.0f} {baseline['time'] / step:5.2f}x" if world <= cores else f"{'-':>8} {'-':>6}"
            same = all(r["digest"] == baseline["digest"] for r in results)
            print(
                f"{world:>2} {mode if world > 1 else '-':<10} {mib(max(state)):>18} {mib(statistics.mean(state))} "
                f"{max(state) / (total / world):9.3f} {max(ns):12.2f} "
                f"{max(ns) / statistics.mean(ns) if statistics.mean(ns) else 1:8.3f} {mib(sent):>13} "
                f"{sent / ideal if ideal else (1.0 if sent == 0 else float('inf')):8.3f} {calls:9.2f} {timing} "
                f"{'yes' if same else 'NO':>11}",
                flush=True,
            )
    print(
        "sent: bytes a rank sends per step (all-gather of W chunks of c: (W-1)c, ring cost; all-to-all: exact); "
        "ideal: replicated 0, zero1 (W-1)/W x params, fsdp2 2(W-1)/W^2 x Muon matrices (each rank's rows of "
        "the direction to their owner, of the orthogonalised direction back). Step time: the median over steps after the first (the only step with --steps 1)."
    )


if __name__ == "__main__":
    main()
