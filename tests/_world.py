"""Run a function on W forked ranks with torch.distributed (gloo, CPU), and get their results.

Forked, not spawned: a world costs a fraction of a second instead of re-importing torch per
rank. The rendezvous is a file store in a fresh directory, so no port can collide. A rank
that hangs fails the test after ``timeout`` seconds instead of blocking the run.
"""

import faulthandler
import os
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, fn, world, folder, timeout, args):
    torch.set_num_threads(1)
    # MLX does not survive a fork (evaluating an array hangs), and a new optimizer's scalars are
    # MLX's once MLX is imported (treeopt.backends.default_backend): earlier tests in the same
    # session import it, so the ranks hide it and get NumPy's scalars, as a torch-only run does
    sys.modules.pop("mlx.core", None)
    faulthandler.dump_traceback_later(max(1, timeout - 5), file=sys.stderr)  # where a hung rank is stuck
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world, timeout=timedelta(seconds=timeout)
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(folder, f"result-{rank}.pt"))
        dist.barrier()  # gloo flakes when ranks leave at once
    finally:
        dist.destroy_process_group()


def run_world(fn, world, *args, timeout=60):
    """``[fn(rank, world, *args) for each rank]``, each run in its own forked process."""
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(
            _rank_main, args=(fn, world, folder, timeout, args), nprocs=world, join=False, start_method="fork"
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"a world of {world} ranks ran longer than {timeout} s")
        return [torch.load(os.path.join(folder, f"result-{r}.pt"), weights_only=False) for r in range(world)]


def warm_up():
    """Pay the first use of DTensor, DCP and DDP (seconds) once in the parent, on a 1-rank group,
    instead of in every forked world (each would pay 3-20 s here)."""
    from torch.distributed.checkpoint import load, save
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))
            value = distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)])
            (value + 1).full_tensor()
            save({"x": value, "y": torch.ones(2)}, checkpoint_id=f"{folder}/checkpoint")
            load({"x": value, "y": torch.ones(2)}, checkpoint_id=f"{folder}/checkpoint")
            model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
            model(torch.ones(1, 2)).sum().backward()
        finally:
            dist.destroy_process_group()
