"""treeopt under jax.jit with NamedSharding on 4 host devices: state sharded like the
parameters, one trace for several steps, Muon on sharded matrices equal to one device.

JAX fixes its device count when it starts, so the checks run in a child process started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (one child per check, with a
timeout, so a hang fails instead of blocking). In that child this module exposes the checks
as tests; in the ordinary test process it exposes the wrappers that start the child.
"""

import contextlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX tests need jax")

CHILD = "TREEOPT_TEST_FOUR_HOST_DEVICES"
FOUR_DEVICES = "--xla_force_host_platform_device_count=4"
CHECKS = [
    "init_shards_state_like_parameters",
    "jitted_steps_trace_once_and_keep_sharding",
    "muon_on_sharded_matrices_equals_one_device",
    "muon_on_a_2d_mesh_outside_jit_and_in_shard_map",
    "collectives_are_one_gather_per_sharded_matrix",
    "optax_adapter_in_a_flax_loop",
]

if os.environ.get(CHILD) != "1":

    @pytest.mark.parametrize("check", CHECKS)
    def test_on_four_host_devices(check):
        env = {
            **os.environ,
            CHILD: "1",
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FOUR_DEVICES}".strip(),
            "JAX_PLATFORMS": "cpu",
        }
        command = [sys.executable, "-m", "pytest", __file__, "-x", "-p", "no:cacheprovider", "-k", check]
        try:
            run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as timeout:
            pytest.fail(f"{check} did not finish in {timeout.timeout} s:\n{timeout.stdout or ''}")
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
        assert re.search(r"\b[1-9]\d* passed", run.stdout), run.stdout[-3000:]  # ran, not skipped

else:
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import treeopt as optim
    import treeopt.jax as tj

    if len(jax.devices()) != 4:
        pytest.skip(f"needs 4 host devices, JAX started with {len(jax.devices())}", allow_module_level=True)
    if not all(hasattr(jax, name) for name in ("typeof", "shard_map", "set_mesh")):
        pytest.skip(f"JAX {jax.__version__} has no typed shardings (jax.typeof, jax.set_mesh)", allow_module_level=True)
    AxisType = jax.sharding.AxisType

    # name: (shape, spec on a 1-D mesh "x" of 4 devices)
    LAYOUT = {
        "embed": ((32, 16), P("x", None)),  # AdamW, sharded rows
        "w_in": ((64, 32), P("x", None)),  # Muon, sharded rows (tall)
        "w_out": ((32, 64), P(None, "x")),  # Muon, sharded columns (wide)
        "conv": ((8, 4, 3), P("x", None, None)),  # Muon, flattened to (8, 12)
        "w_small": ((12, 20), P()),  # Muon, replicated
        "bias": ((64,), P("x")),  # AdamW
        "scale": ((6,), P()),
    }  # AdamW, replicated
    MUON = {"w_in", "w_out", "conv", "w_small"}

    def muon_adamw():
        return optim.MultiOptimizer(
            [optim.Muon(0.02, weight_decay=0.01), optim.AdamW(optim.cosine_decay(1e-2, 10))],
            [lambda path, w: path in MUON],
        )

    def tree(seed):
        rng = np.random.default_rng(seed)
        return {name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _) in LAYOUT.items()}

    def mesh_1d(kind):
        return jax.make_mesh((4,), ("x",), axis_types=(kind,))

    def placed(values, mesh):
        """``values`` on ``mesh`` as LAYOUT says, or on one device when ``mesh`` is None."""
        if mesh is None:
            return {name: jnp.asarray(value) for name, value in values.items()}
        return {name: jax.device_put(value, NamedSharding(mesh, LAYOUT[name][1])) for name, value in values.items()}

    def slots_by_parameter(state):
        """``{(child, name, slot): array}`` of a MultiOptimizer state."""
        return {
            (i, name, slot): value
            for i, child in enumerate(state["states"])
            for name, slots in child.items()
            if isinstance(slots, dict)
            for slot, value in slots.items()
        }

    def run_steps(mesh, steps=3, jit=True):
        """Parameters and state after ``steps`` updates with fixed gradients, and the trace count."""
        opt, traces = muon_adamw(), []

        def step(params, grads, state):
            traces.append(1)
            return tj.update(opt, grads, state, params)

        step = jax.jit(step) if jit else step
        params = placed(tree(0), mesh)
        state = tj.init(opt, params)
        for seed in range(1, steps + 1):
            params, state = step(params, placed(tree(seed), mesh), state)
        return params, state, len(traces)

    def test_init_shards_state_like_parameters():
        for kind in (AxisType.Auto, AxisType.Explicit):
            mesh = mesh_1d(kind)
            params = placed(tree(0), mesh)
            state = tj.init(muon_adamw(), params)
            slots = slots_by_parameter(state)
            assert {name for _, name, _ in slots} == set(LAYOUT)
            for (_, name, slot), value in slots.items():
                assert value.sharding == params[name].sharding, (kind, name, slot, value.sharding)
                # each device holds its part only: 1/4 of a sharded slot, all of a replicated one
                parts = {shard.data.shape for shard in value.addressable_shards}
                expected = params[name].addressable_shards[0].data.shape
                assert parts == {expected}, (name, slot, parts)
            for child in state["states"]:  # step and learning rate: one copy per device of the mesh
                for key in ("step", "learning_rate"):
                    assert child[key].sharding == NamedSharding(mesh, P()), (key, child[key].sharding)
            # factored slots (another shape than the parameter) are replicated on the same mesh
            factored = tj.init(optim.Adafactor(), {"w_in": params["w_in"]})
            for slot, value in factored["w_in"].items():
                assert value.sharding == NamedSharding(mesh, P()), (slot, value.sharding)

    def test_jitted_steps_trace_once_and_keep_sharding():
        # Auto axes with no mesh in context (jit infers it), Explicit ones under jax.set_mesh
        for kind, context in ((AxisType.Auto, False), (AxisType.Explicit, True)):
            mesh = mesh_1d(kind)
            with jax.set_mesh(mesh) if context else contextlib.nullcontext():
                params, state, traces = run_steps(mesh, steps=3)
                first = tj.init(muon_adamw(), placed(tree(0), mesh))
            assert traces == 1, (kind, context, traces)
            before, after = jax.tree.leaves(first), jax.tree.leaves(state)
            for old, new in zip(before, after, strict=True):
                assert new.sharding.is_equivalent_to(old.sharding, new.ndim), (kind, old.sharding, new.sharding)
            for name, value in params.items():
                assert value.sharding.is_equivalent_to(NamedSharding(mesh, LAYOUT[name][1]), value.ndim), name

    def test_muon_on_sharded_matrices_equals_one_device():
        reference, reference_state, _ = run_steps(None)
        for kind in (AxisType.Auto, AxisType.Explicit):
            params, state, _ = run_steps(mesh_1d(kind))
            for name in LAYOUT:  # bit for bit: each device runs the one-device computation
                np.testing.assert_array_equal(
                    np.asarray(params[name]), np.asarray(reference[name]), err_msg=f"{name}, {kind}"
                )
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference_state), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def test_muon_on_a_2d_mesh_outside_jit_and_in_shard_map():
        rng = np.random.default_rng(7)
        weight, grad = (rng.standard_normal((16, 24)).astype(np.float32) for _ in range(2))

        def one_step_on(w, g):
            opt = optim.Muon(0.02)
            return tj.update(opt, {"w": g}, tj.init(opt, {"w": w}), {"w": w})[0]["w"]

        def one_step(place, jit):
            return (jax.jit(one_step_on) if jit else one_step_on)(place(weight), place(grad))

        # a matrix split along both axes of a 2-D mesh, in a jitted step
        mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
        split = NamedSharding(mesh, P("data", "model"))
        sharded = one_step(lambda a: jax.device_put(a, split), jit=True)
        assert sharded.sharding.is_equivalent_to(split, 2)
        np.testing.assert_array_equal(np.asarray(sharded), np.asarray(one_step(jnp.asarray, jit=True)))
        # op by op, outside jit
        reference = one_step(jnp.asarray, jit=False)
        for kind, spec in ((AxisType.Auto, P(None, "x")), (AxisType.Explicit, P("x", None))):
            rows = NamedSharding(mesh_1d(kind), spec)
            sharded = one_step(lambda a: jax.device_put(a, rows), jit=False)
            assert sharded.sharding == rows
            np.testing.assert_array_equal(np.asarray(sharded), np.asarray(reference), err_msg=str(kind))
        # inside shard_map the user has chosen per-device blocks: each block is its own matrix
        rows = NamedSharding(mesh_1d(AxisType.Explicit), P("x", None))
        blockwise = jax.jit(
            jax.shard_map(
                lambda w, g: one_step_on(w, g), mesh=rows.mesh, in_specs=(P("x", None),) * 2, out_specs=P("x", None)
            )
        )(*(jax.device_put(a, rows) for a in (weight, grad)))
        blockwise = np.asarray(blockwise)
        for block in range(4):
            part = slice(4 * block, 4 * block + 4)
            expected = jax.jit(one_step_on)(jnp.asarray(weight[part]), jnp.asarray(grad[part]))
            np.testing.assert_array_equal(blockwise[part], np.asarray(expected))

    def test_collectives_are_one_gather_per_sharded_matrix():
        sharded_muon = [name for name in MUON if LAYOUT[name][1] != P()]
        for kind in (AxisType.Auto, AxisType.Explicit):
            mesh, opt = mesh_1d(kind), muon_adamw()
            params, grads = placed(tree(0), mesh), placed(tree(1), mesh)
            step = jax.jit(lambda p, g, s: tj.update(opt, g, s, p))
            compiled = step.lower(params, grads, tj.init(opt, params)).compile().as_text()
            collectives = re.findall(
                r" (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)"
                r"(?:-start)?\(",
                compiled,
            )
            # Newton-Schulz runs on gathered matrices: no partial Grams reduced in every iteration
            assert sorted(collectives) == ["all-gather"] * len(sharded_muon), (kind, collectives)

    def test_optax_adapter_in_a_flax_loop():
        optax = pytest.importorskip("optax")
        linen = pytest.importorskip("flax.linen")

        class Net(linen.Module):
            @linen.compact
            def __call__(self, x):
                x = linen.relu(linen.Dense(32, name="hidden")(x))
                return linen.Dense(4, name="head")(x)

        net, rng = Net(), np.random.default_rng(3)
        x = jnp.asarray(rng.standard_normal((16, 8)).astype(np.float32))
        y = jnp.asarray(rng.standard_normal((16, 4)).astype(np.float32))
        initial = net.init(jax.random.key(0), x)["params"]
        mesh = mesh_1d(AxisType.Auto)
        specs = {"hidden": {"kernel": P(None, "x"), "bias": P("x")}, "head": {"kernel": P("x", None), "bias": P()}}

        def train(shard):
            multi = optim.MultiOptimizer(
                [optim.Muon(0.02), optim.AdamW(1e-2)], [lambda path, w: path.endswith("hidden.kernel")]
            )
            tx = optax.chain(optax.clip_by_global_norm(1.0), tj.as_optax(multi))
            params = (
                jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), initial, specs)
                if shard
                else initial
            )
            opt_state, traces, losses = tx.init(params), [], []

            @jax.jit
            def step(params, opt_state):
                traces.append(1)
                loss, grads = jax.value_and_grad(lambda p: jnp.mean((net.apply({"params": p}, x) - y) ** 2))(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            first_state = opt_state
            for _ in range(4):
                params, opt_state, loss = step(params, opt_state)
                losses.append(float(loss))
            return params, first_state, opt_state, len(traces), losses

        params, first_state, opt_state, traces, losses = train(shard=True)
        reference, _, _, _, reference_losses = train(shard=False)
        assert traces == 1 and losses[-1] < losses[0]
        slots = slots_by_parameter(first_state[1])
        for (_, name, slot), value in slots.items():
            layer, leaf = name.split(".")
            assert value.sharding == NamedSharding(mesh, specs[layer][leaf]), (name, slot, value.sharding)
        for old, new in zip(jax.tree.leaves(first_state), jax.tree.leaves(opt_state), strict=True):
            assert new.sharding.is_equivalent_to(old.sharding, new.ndim)
        # the model's own matmuls are partitioned by XLA, so gradients differ in rounding
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
