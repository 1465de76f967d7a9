"""treeopt under JAX sharding: optimizer state bytes per device, and step time sharded vs not.

    python benchmarks/distributed_jax.py                  # 4 simulated host devices
    python benchmarks/distributed_jax.py --devices 2 --rounds 5

Devices are simulated (``--xla_force_host_platform_device_count``): they share this
machine's cores, so a sharded step does the same work as one device plus the copies between
"devices", and on 2 cores it cannot be faster. The times show what sharding costs here, not
what it saves on real accelerators; the bytes per device are what they would be.

Parameters are placed FSDP-style on a 1-D mesh: each array split along its largest axis that
the device count divides (the rest replicated). Bytes: the state's bytes on each device, max
and min over devices, against total/devices (the ideal) and against optax in the same run.
Times: one jitted step with fixed gradients, median of rounds interleaved with its peers:
AdamW on the GPT-2 small tree, Muon (hidden matrices) + AdamW on ``--muon-layers`` blocks of
it. Muon gathers each sharded matrix whole on every device (one all-gather; see
docs/distributed-jax-mlx.md), so every device runs its Newton-Schulz.
"""

import argparse
import os
import platform
import statistics
import sys
import time


def parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--muon-layers", type=int, default=1, help="GPT-2 blocks in the Muon+AdamW timing")
    return parser.parse_args()


ARGS = parse()
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ARGS.devices}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import (
    NamedSharding,  # noqa: E402
    PartitionSpec as P,  # noqa: E402
)

import treeopt as optim  # noqa: E402
import treeopt.jax as tj  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from step import gpt2_shapes  # noqa: E402


def cpu_name():
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def spec_for(shape, devices):
    """Split the largest axis the device count divides; replicate when none does."""
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % devices == 0:
            return P(*[("x" if a == axis else None) for a in range(len(shape))])
    return P()


def is_hidden_matrix(path, w):
    return w.ndim == 2 and path.startswith("h.")


def gpt2_tree(layers=12):
    return {k: s for k, s in gpt2_shapes().items() if not k.startswith("h.") or int(k.split(".")[1]) < layers}


def make(shapes, mesh, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        value = jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02)
        out[name] = value if mesh is None else jax.device_put(value, NamedSharding(mesh, spec_for(shape, mesh.size)))
    return out


def bytes_per_device(state):
    per_device = {}
    for leaf in jax.tree.leaves(state):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    return max(per_device.values()), min(per_device.values()), total, len(per_device)


def memory_table(mesh):
    shapes = gpt2_tree()
    params = make(shapes, mesh, 0)
    print(
        f"\nOptimizer state per device, GPT-2 small ({sum(np.prod(s) for s in shapes.values()) / 1e6:.1f}M "
        f"parameters, {len(shapes)} tensors), {mesh.size} devices"
    )
    print(
        f"{'optimizer':32s} {'total MiB':>10s} {'max/device':>11s} {'min/device':>11s} {'total/dev':>10s} "
        f"{'max/ideal':>9s}"
    )
    candidates = {
        "treeopt AdamW": lambda: tj.init(optim.AdamW(3e-4), params),
        "optax.adamw": lambda: optax.adamw(3e-4).init(params),
        "treeopt Muon+AdamW": lambda: tj.init(
            optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [is_hidden_matrix]), params
        ),
        "treeopt Adafactor (factored)": lambda: tj.init(optim.Adafactor(), params),
    }
    for name, init in candidates.items():
        state = init()
        high, low, total, devices = bytes_per_device(state)
        ideal = total / mesh.size
        print(
            f"{name:32s} {total / 2**20:10.1f} {high / 2**20:11.1f} {low / 2**20:11.1f} {ideal / 2**20:10.1f} "
            f"{high / ideal:9.3f}"
        )
        del state


def timed(step, args, rounds_out):
    jax.block_until_ready(step(*args))  # compile
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    rounds_out.append(time.perf_counter() - start)


def collectives(step, args):
    import re

    text = step.lower(*args).compile().as_text()
    found = re.findall(r" (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(?:-start)?\(", text)
    return {kind: found.count(kind) for kind in sorted(set(found))}


def time_table(mesh, rounds, muon_layers):
    print(
        f"\nStep time (jit, fixed gradients), median of {rounds} rounds interleaved; {mesh.size} simulated devices "
        f"on {os.cpu_count()} cores of {cpu_name()}; other work was running on this machine"
    )
    cases = {}
    for label, shapes, make_opt in (
        ("AdamW, GPT-2 small", gpt2_tree(), lambda: optim.AdamW(3e-4)),
        (
            f"Muon+AdamW, GPT-2 {muon_layers} block(s)",
            gpt2_tree(muon_layers),
            lambda: optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [is_hidden_matrix]),
        ),
    ):
        for where in ("one device", "sharded"):
            m = None if where == "one device" else mesh
            opt = make_opt()
            params, grads = make(shapes, m, 0), make(shapes, m, 1)
            step = jax.jit(lambda p, g, s, opt=opt: tj.update(opt, g, s, p))
            cases[(label, where, "treeopt")] = (step, (params, grads, tj.init(opt, params)))
            if label.startswith("AdamW"):
                tx = optax.adamw(3e-4)

                def optax_step(p, g, s, tx=tx):
                    updates, s = tx.update(g, s, p)
                    return optax.apply_updates(p, updates), s

                cases[(label, where, "optax")] = (jax.jit(optax_step), (params, grads, tx.init(params)))
    times = {key: [] for key in cases}
    for _ in range(rounds):
        for key, (step, args) in cases.items():
            timed(step, args, times[key])
    print(f"{'step':34s} {'library':8s} {'one device':>11s} {'sharded':>9s} {'ratio':>6s}  collectives (sharded)")
    for label, library in dict.fromkeys((k[0], k[2]) for k in cases):
        one = statistics.median(times[(label, "one device", library)])
        sharded = statistics.median(times[(label, "sharded", library)])
        step, args = cases[(label, "sharded", library)]
        print(
            f"{label:34s} {library:8s} {one * 1e3:9.1f}ms {sharded * 1e3:7.1f}ms {sharded / one:6.2f}  "
            f"{collectives(step, args)}"
        )


def main():
    devices = jax.devices()
    if len(devices) != ARGS.devices:
        raise SystemExit(f"JAX started with {len(devices)} devices, not {ARGS.devices}: run this script on its own")
    mesh = jax.make_mesh((ARGS.devices,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, {ARGS.devices} host devices simulated on "
        f"{os.cpu_count()} cores ({cpu_name()})"
    )
    memory_table(mesh)
    time_table(mesh, ARGS.rounds, ARGS.muon_layers)


if __name__ == "__main__":
    main()
