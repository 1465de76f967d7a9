"""What treeopt.torch.Optimizer adds to a step: its torch.optim bookkeeping (noticing new
parameters, applying param_groups edits, showing schedules) against the bare treeopt update
on the same kind of model, timed in one process, interleaved round by round. The step itself
against torch.optim and the bandwidth bound is benchmarks/step.py's subject.

    python benchmarks/torch_adapter.py [--tensors 400] [--size 64] [--rounds 30]

Small tensors on purpose: the adapter's cost is per step and per tensor, not per element.
"""

import argparse
import platform
import statistics
import time

import torch

import treeopt as optim
import treeopt.torch


def model_of(tensors, size):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(size, size) for _ in range(tensors // 2)])


def fill_grads(model):
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=400)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)

    adapted = model_of(args.tensors, args.size)
    adapter = treeopt.torch.Optimizer(adapted, optim.AdamW(1e-3, bias_correction=True))
    bare_model = model_of(args.tensors, args.size)
    bare = optim.AdamW(1e-3, bias_correction=True)
    bare_params = dict(bare_model.named_parameters())

    def bare_step():
        with torch.no_grad():
            bare.update(bare_params, {n: p.grad for n, p in bare_params.items()})

    candidates = {
        "treeopt AdamW, bare update()": (bare_model, bare_step),
        "treeopt.torch.Optimizer(AdamW)": (adapted, adapter.step),
    }
    times = {name: [] for name in candidates}
    for model, _ in candidates.values():
        fill_grads(model)
    for _ in range(3):  # warm-up: state, compiled step
        for _, step in candidates.values():
            step()
    for _ in range(args.rounds):
        for name, (_, step) in candidates.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    print(
        f"{args.tensors} tensors of {args.size}x{args.size} and {args.size}; one thread; "
        f"{platform.processor() or platform.machine()}; torch {torch.__version__}"
    )
    base = statistics.median(times["treeopt AdamW, bare update()"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:34s} {median * 1e3:8.3f} ms   {median / base:5.2f}x the bare update")


if __name__ == "__main__":
    main()
