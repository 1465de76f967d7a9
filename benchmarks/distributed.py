"""treeopt on several ranks: memory, Newton-Schulz work, traffic and step time per mode.

    python benchmarks/distributed.py [--worlds 1 2 4] [--modes replicated zero1] [--steps 2]

The GPT-2 small tree (124M parameters, 148 tensors, built directly: no model, no download)
under ``optim.muon_adamw()`` (48 hidden matrices to Muon, the rest to AdamW), on W forked CPU
ranks with gloo and one thread each. Every rank gets the same gradients, as DDP would give
them (DDP's own all-reduce is not counted: it is the same in every mode). Per world and mode:

- optimizer state bytes per rank (max, mean) against total/W;
- Newton-Schulz GFLOP per rank per step (max/mean);
- bytes each rank sends per step and collectives per step, against the ideal of the mode
  (replicated: nothing; zero1: an all-gather of the new values, (W-1)/W x params per rank);
- the optimizer step's median time (max over ranks), only where ranks <= cores;
- whether the parameters after the steps equal world 1's, bit for bit.
"""

import argparse
import hashlib
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
from step import gpt2_shapes  # noqa: E402

import treeopt as optim  # noqa: E402
import treeopt.torch  # noqa: E402
from treeopt.engine import slot_items  # noqa: E402


def rank_main(rank, world, mode, steps, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1200))
    generator = torch.Generator().manual_seed(0)
    params = [(n, torch.nn.Parameter(torch.randn(s, generator=generator) * 0.02)) for n, s in gpt2_shapes().items()]
    grads = {n: torch.randn(s, generator=generator) * 1e-3 for n, s in gpt2_shapes().items()}
    opt = treeopt.torch.Optimizer(params, optim.muon_adamw(), sharding=mode if world > 1 else None)
    import treeopt.rules.muon as muon_rule

    ns_flops = []
    original = muon_rule.newton_schulz
    from treeopt.distributed.ownership import newton_schulz_flops

    def counted(x, ns_steps, *rest):
        ns_flops.append(newton_schulz_flops(tuple(x.shape), ns_steps))
        return original(x, ns_steps, *rest)

    muon_rule.newton_schulz = counted
    times = []
    for step in range(steps):
        for name, p in params:
            p.grad = grads[name]
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    state_bytes = sum(v.numel() * v.element_size() for child in opt.optimizer.stateful()
                      for _, slots in slot_items(child) for v in slots.values())
    digest = hashlib.sha256()
    for _, p in params:
        digest.update(p.detach().numpy().tobytes())
    comm = getattr(opt._distributed, "comm", None)
    result = {"state_bytes": state_bytes, "ns_gflop": sum(ns_flops) / steps / 1e9,
              "sent": (comm.sent_bytes if comm else 0) / steps, "calls": (comm.calls if comm else 0),
              "time": statistics.median(times[1:]) if steps > 1 else times[0], "digest": digest.hexdigest(),
              "param_bytes": sum(p.numel() * p.element_size() for _, p in params),
              "muon": sum(1 for n, _ in params if opt.optimizer.route(n) == 0)}
    torch.save(result, os.path.join(folder, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run(world, mode, steps):
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(rank_main, args=(world, mode, steps, folder), nprocs=world, start_method="fork")
        return [torch.load(os.path.join(folder, f"{r}.pt")) for r in range(world)]


def mib(n):
    return f"{n / 2**20:8.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=["replicated", "zero1"])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"GPT-2 small tree, optim.muon_adamw(), float32, gloo, 1 thread per rank; {cores} cores ({cpu}); "
          f"torch {torch.__version__}; other work may share the machine: times are indicative only")
    baseline = run(1, None, args.steps)[0]
    total = baseline["state_bytes"]
    print(f"world 1: {baseline['muon']} Muon matrices, params {mib(baseline['param_bytes'])} MiB, "
          f"state {mib(total)} MiB, Newton-Schulz {baseline['ns_gflop']:.1f} GFLOP/step, "
          f"step {baseline['time'] * 1e3:.0f} ms")
    header = (f"{'W':>2} {'mode':<10} {'state/rank MiB max':>18} {'mean':>8} {'max/(S/W)':>9} "
              f"{'NS GFLOP max':>12} {'max/mean':>8} {'sent MiB/step':>13} {'vs ideal':>8} {'coll/step':>9} "
              f"{'step ms':>8} {'vs W=1':>6} {'same as W=1':>11}")
    print(header)
    for world in args.worlds:
        for mode in args.modes:
            if world == 1 and mode != args.modes[0]:
                continue
            results = baseline and [baseline] if world == 1 else run(world, mode, args.steps)
            state = [r["state_bytes"] for r in results]
            ns = [r["ns_gflop"] for r in results]
            sent = max(r["sent"] for r in results)
            ideal = (world - 1) / world * baseline["param_bytes"] if mode == "zero1" else 0
            calls = max(r["calls"] for r in results) / args.steps
            step = max(r["time"] for r in results)
            timing = f"{step * 1e3:8.0f} {baseline['time'] / step:5.2f}x" if world <= cores else f"{'-':>8} {'-':>6}"
            same = all(r["digest"] == baseline["digest"] for r in results)
            print(f"{world:>2} {mode if world > 1 else '-':<10} {mib(max(state)):>18} {mib(statistics.mean(state))} "
                  f"{max(state) / (total / world):9.3f} {max(ns):12.2f} "
                  f"{max(ns) / statistics.mean(ns) if statistics.mean(ns) else 1:8.3f} {mib(sent):>13} "
                  f"{sent / ideal if ideal else (1.0 if sent == 0 else float('inf')):8.3f} {calls:9.2f} {timing} "
                  f"{'yes' if same else 'NO':>11}")
    print("sent: bytes a rank sends per step under a ring's cost (all-gather of W chunks of c: (W-1)c); "
          "ideal: replicated 0, zero1 (W-1)/W x params. coll/step includes one plan check at start-up.")


if __name__ == "__main__":
    main()
