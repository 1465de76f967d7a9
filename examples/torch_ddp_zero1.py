"""PyTorch on several processes: DDP for the gradients, treeopt's ZeRO-1 for the optimizer
state (Muon for the hidden matrices, AdamW for the rest), and a checkpoint that
``torch.distributed.checkpoint`` saves at one world size and resumes at another.

    torchrun --standalone --nproc_per_node 2 examples/torch_ddp_zero1.py --steps 100 --checkpoint ddp-checkpoint
    torchrun --standalone --nproc_per_node 1 examples/torch_ddp_zero1.py --steps 50 --checkpoint ddp-checkpoint

The second command resumes the first one's checkpoint on one process.

Install (from the treeopt checkout): pip install -e ".[torch]"
"""

import argparse
import os
import warnings

try:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.nn.parallel import DistributedDataParallel
except ImportError as error:  # missing, or installed without what it needs (a bare mlx on Linux)
    raise SystemExit(
        f"PyTorch cannot be imported ({error}): pip install -e '.[torch]' (from the treeopt checkout)"
    ) from None

from digits_data import train_test_split

import treeopt as optim
import treeopt.torch


def hidden_matrix(name, param):
    return name.startswith("hidden.") and param.ndim == 2


def main(steps, checkpoint=None, seed=0):
    dist.init_process_group("gloo")  # "nccl" on GPUs; torchrun sets rank and world size
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)  # the same initial model on every rank
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in train_test_split(seed))
    model = torch.nn.Sequential()
    model.add_module("embed", torch.nn.Linear(64, 128))
    model.add_module("act", torch.nn.GELU())
    model.add_module("hidden", torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU()))
    model.add_module("head", torch.nn.Linear(128, 10))
    ddp = DistributedDataParallel(model)

    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [hidden_matrix], max_grad_norm=1.0)
    opt = treeopt.torch.Optimizer(model, multi, sharding="zero1")  # names as in one process

    start = 0
    if checkpoint and os.path.exists(os.path.join(checkpoint, ".metadata")):
        state = {"model": model.state_dict(), "optim": opt}
        dcp.load(state, checkpoint_id=checkpoint)  # reshards to this world size
        model.load_state_dict(state["model"])
        start = int(multi.step)
        if rank == 0:
            print(f"resumed at step {start} on {world} process(es)")
    if rank == 0:
        opt.plan().print()  # who owns what on this world size, at the step it starts from

    generator = torch.Generator().manual_seed(seed + start)
    for step in range(start, start + steps):
        batch = torch.randint(len(y_train), (128,), generator=generator)
        mine = batch[rank::world]  # each rank its share of the batch; DDP averages the gradients
        loss = torch.nn.functional.cross_entropy(ddp(x_train[mine]), y_train[mine])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 50 == 0 or step == start + steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}")
    if checkpoint:
        with warnings.catch_warnings():  # replacing the checkpoint it resumed from is the point: no warning
            warnings.filterwarnings("ignore", "Detected an existing checkpoint")
            dcp.save({"model": model.state_dict(), "optim": opt}, checkpoint_id=checkpoint)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    if rank == 0:
        print(f"test accuracy {100 * accuracy:.1f}%")
    dist.barrier()
    dist.destroy_process_group()
    return loss.item(), accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--checkpoint", default=None, help="a folder: resume from it if it holds a checkpoint, save to it"
    )
    arguments = parser.parse_args()
    main(arguments.steps, arguments.checkpoint)
