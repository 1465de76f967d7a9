"""Saving and loading a large optimizer state, against the disk and in memory.

    python benchmarks/checkpoint.py [--folder DIR] [--library numpy|torch]

Builds the AdamW state of GPT-2 small (124M parameters: two float32 slots, about 1 GB),
then times ``checkpoint.save`` and ``checkpoint.load`` against writing and reading the same
number of bytes with plain file I/O (write + fsync; read) in the same run, and reports the
peak memory each adds, in units of the state's size (the target: at most one extra copy).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import PeakMemory, gpt2_shapes  # noqa: E402

import treeopt as optim  # noqa: E402
from treeopt import checkpoint  # noqa: E402


def raw_io(path, nbytes):
    """Seconds to write ``nbytes`` (with fsync) and to read them back."""
    block = np.random.default_rng(0).integers(0, 255, 1 << 26, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb") as file:
        for _ in range(nbytes // len(block)):
            file.write(block)
        file.write(block[: nbytes % len(block)])
        file.flush()
        os.fsync(file.fileno())
    write = time.perf_counter() - start
    start = time.perf_counter()
    with open(path, "rb") as file:
        while file.readinto(bytearray(len(block))):
            pass
    read = time.perf_counter() - start
    os.remove(path)
    return write, read


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--library", default="numpy", choices=["numpy", "torch"])
    args = parser.parse_args(argv)
    folder = args.folder or tempfile.mkdtemp(prefix="treeopt-checkpoint-")
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s, dtype=np.float32) for k, s in gpt2_shapes().items()}
    grads = {k: rng.standard_normal(s, dtype=np.float32) * 0.01 for k, s in gpt2_shapes().items()}
    if args.library == "torch":
        import torch

        params = {k: torch.from_numpy(v) for k, v in params.items()}
        grads = {k: torch.from_numpy(v) for k, v in grads.items()}
    opt = optim.AdamW(1e-3)
    opt.update(params, grads)
    state_bytes = sum(v.nbytes for _, v in optim.tree.tree_flatten(opt.state))
    print(f"AdamW state of GPT-2 small on {args.library}: {state_bytes / 2**30:.2f} GiB in {folder}", flush=True)

    write, read = raw_io(os.path.join(folder, "raw.bin"), state_bytes)
    print(
        f"plain file I/O of the same bytes: write+fsync {write:.2f} s ({state_bytes / write / 1e9:.2f} GB/s), "
        f"read {read:.2f} s ({state_bytes / read / 1e9:.2f} GB/s)",
        flush=True,
    )

    path = os.path.join(folder, "opt.safetensors")
    with PeakMemory() as peak:
        start = time.perf_counter()
        checkpoint.save(opt, path)
        seconds = time.perf_counter() - start
    print(
        f"checkpoint.save: {seconds:.2f} s ({seconds / write:.2f}x plain write), "
        f"peak memory +{peak.added / state_bytes:.2f} state copies",
        flush=True,
    )

    fresh = optim.AdamW(1e-3)
    fresh.update(params, grads)  # its state is resident before the load, as a trained one would be
    with PeakMemory() as peak:
        start = time.perf_counter()
        report = checkpoint.load(fresh, path)
        seconds = time.perf_counter() - start
    print(
        f"checkpoint.load: {seconds:.2f} s ({seconds / read:.2f}x plain read), "
        f"peak memory +{peak.added / state_bytes:.2f} state copies; {report}",
        flush=True,
    )
    os.remove(path)


if __name__ == "__main__":
    main()
