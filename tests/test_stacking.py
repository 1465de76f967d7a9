"""Stacked Muon: same-shape matrices orthogonalised together give the per-matrix rule's numbers
(float32: up to the summation order of the matrix products; NumPy: exactly), on every backend,
through the rule, the general engine and the compiled step."""

import copy

import numpy as np
import pytest

import treeopt as optim
import treeopt.kernels as kernels
from treeopt.kernels import stacking
from treeopt.rules.muon import MUON
from treeopt.tree import tree_flatten

from arrays import as_float64, backend_params, make

SHAPES = [(6, 6), (8, 5), (5, 8), (4, 3, 2, 2), (7,)]  # square, tall, wide, a convolution, a vector
# float32: the products' summation order may differ between the batched and the single call
CLOSE = {
    "float32": dict(rtol=2e-5, atol=2e-6),
    "float16": dict(rtol=2e-3, atol=2e-3),
    "bfloat16": dict(rtol=1.6e-2, atol=1.6e-2),
}


def coefficients(backend, dtype, **hyper):
    settings = (
        dict(
            momentum=0.95,
            weight_decay=0.01,
            decoupled_weight_decay=False,
            nesterov=True,
            ns_steps=5,
            ns_dtype=None,
            ns_eps=1e-7,
            adjust_lr="original",
            layout="out_in",
        )
        | hyper
    )
    values = MUON.coefficients(0.02, 3.0, **settings)
    lr = make(values.pop("lr"), backend, dtype)
    return dict(values, lr=lr)


def data(shape, count, backend, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [
        [make(rng.standard_normal(shape) * scale, backend, dtype) for _ in range(count)] for scale in (0.1, 1.0, 0.05)
    ]  # grads, params, v


HYPER = [
    dict(),
    dict(ns_dtype="bfloat16"),
    dict(layout="in_out", adjust_lr="match_rms_adamw"),
    dict(decoupled_weight_decay=True, nesterov=False),
]


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()) or "defaults")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_rule_on_a_stack_equals_the_rule_per_tensor(shape, backend, dtype, hyper):
    from treeopt.backends import backend_of

    grads, params, vs = data(shape, 4, backend, dtype)
    values = coefficients(backend, dtype, **hyper)
    lib = backend_of(grads[0])
    new_params, new_v = stacking.update_stacked(MUON.update, values, lib, grads, params, [vs])
    assert tuple(lib.shape(new_params)) == (4,) + shape
    for k in range(4):
        alone_param, alone_v = MUON.update(grads[k], params[k], vs[k], **values)
        close = dict(rtol=0, atol=0) if backend == "numpy" and dtype == "float32" else CLOSE[dtype]
        np.testing.assert_allclose(as_float64(new_params[k]), as_float64(alone_param), **close)
        np.testing.assert_array_equal(as_float64(new_v[k]), as_float64(alone_v))  # elementwise: exact


def test_chunks_keep_numpy_stacks_in_cache():
    from treeopt.backends import backend_of

    numpy_like = np.zeros((64, 64), np.float32)  # 16 KiB
    runs = stacking.chunks(backend_of(numpy_like), numpy_like, list(range(100)))
    assert [len(r) for r in runs] == [32, 32, 32, 4] and sum(runs, []) == list(range(100))
    big = np.zeros((1024, 1024), np.float32)
    assert stacking.chunks(backend_of(big), big, [3, 5]) == [[3], [5]]
    assert stacking.groups_by_shape([(2, 2), (3,), (2, 2), (3,), (4, 4)]) == [[0, 2], [1, 3], [4]]


def tree(backend, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {f"blocks.{i}.w": (8, 6) for i in range(5)} | {f"blocks.{i}.conv": (3, 2, 2, 2) for i in range(3)}
    shapes |= {"embed": (9, 4), "blocks.0.b": (6,), "blocks.1.b": (6,)}
    return {k: make(rng.standard_normal(s), backend, dtype) for k, s in shapes.items()}


def steps(backend, dtype, count=3):
    return [tree(backend, dtype, seed=s + 1) for s in range(count)]


def assert_close(a, b, exact):
    for (key, x), (_, y) in zip(tree_flatten(a), tree_flatten(b)):
        if exact:
            np.testing.assert_array_equal(as_float64(x), as_float64(y), err_msg=key)
        else:
            np.testing.assert_allclose(as_float64(x), as_float64(y), err_msg=key, **CLOSE["float32"])


def per_tensor(monkeypatch):
    """Runs with one tensor per call of the rule (the reference)."""
    monkeypatch.setattr(stacking, "chunks", lambda backend, like, indices: [[k] for k in indices])


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("backend", backend_params())
def test_muon_steps_on_stacks_equal_the_per_tensor_steps(backend, compiled, monkeypatch):
    def run():
        params = tree(backend, "float32")
        opt = optim.Muon(0.02, weight_decay=0.01)
        kernels.enabled = compiled
        try:
            for g in steps(backend, "float32"):
                if backend in ("numpy", "torch"):
                    opt.update(params, g)
                else:
                    params = opt.apply_gradients(g, params)
        finally:
            kernels.enabled = True
        return params, opt

    stacked_params, stacked = run()
    if compiled and backend in ("numpy", "torch"):
        (bucket,) = stacked._compiled.buckets
        runs, _ = bucket.stacks["plan"]  # planned once, with the step
        assert sorted(len(run) for run, _ in runs) == [2, 3, 5]  # biases, convolutions, matrices
    with monkeypatch.context() as patch:
        per_tensor(patch)
        alone_params, alone = run()
    exact = backend == "numpy"
    assert_close(stacked_params, alone_params, exact)
    assert_close(stacked.state, alone.state, exact)


def test_a_stacked_step_writes_every_parameter_and_slot_in_place():
    params = tree("numpy", "float32")
    originals = {k: v for k, v in params.items()}
    before = copy.deepcopy(params)
    opt = optim.Muon(0.02)
    for g in steps("numpy", "float32"):
        opt.update(params, g)
    assert all(params[k] is originals[k] for k in params)
    assert all(not np.array_equal(params[k], before[k]) for k in params)
    slots = opt.state
    assert all(np.abs(slots[k]["v"]).sum() > 0 for k in params)


@pytest.mark.parametrize("backend", backend_params(["jax"]))
def test_muon_under_jit_stacks_same_shape_matrices(backend, monkeypatch):
    import jax

    import treeopt.jax as tj

    params = tree("jax", "float32")
    opt = optim.Muon(0.02)
    state = tj.init(opt, params)
    grads = steps("jax", "float32", 1)[0]
    new_params, _ = jax.jit(lambda p, s, g: tj.update(opt, g, s, p))(params, state, grads)
    with monkeypatch.context() as patch:
        per_tensor(patch)
        alone_params, _ = jax.jit(lambda p, s, g: tj.update(opt, g, s, p))(params, tj.init(opt, params), grads)
    assert_close(new_params, alone_params, exact=False)


def many_matrices(count, seed=0):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    return {f"layers.{i}.w": jnp.asarray(rng.standard_normal((6, 4), dtype=np.float32)) for i in range(count)}


@pytest.mark.parametrize("backend", backend_params(["jax"]))
def test_muon_under_jit_on_more_matrices_than_one_stacking_call_takes(backend, monkeypatch):
    # past the JAX backend's chunk, stacks are built in chunks and read back by gathers
    import jax

    import treeopt.jax as tj
    from treeopt.backends import jax_backend

    count = jax_backend._CHUNK * 2 + 3
    params, grads = many_matrices(count), many_matrices(count, seed=1)
    opt = optim.Muon(0.02, weight_decay=0.01)
    step = jax.jit(lambda p, s, g: tj.update(opt, g, s, p))
    new_params, new_state = step(params, tj.init(opt, params), grads)
    with monkeypatch.context() as patch:
        per_tensor(patch)
        alone_params, alone_state = step.__wrapped__(params, tj.init(opt, params), grads)  # eagerly, one by one
    assert_close(new_params, alone_params, exact=False)
    assert_close(
        {k: v["v"] for k, v in new_state.items() if k in params},
        {k: v["v"] for k, v in alone_state.items() if k in params},
        exact=False,
    )


def distinct_kernels(hlo):
    """The distinct fused computations of an optimized HLO module's text (names left out)."""
    import re

    bodies = set()
    for block in re.split(r"\n(?=\S)", hlo):
        if block.startswith("%fused") or block.startswith("fused"):
            lines = [line.split(", metadata")[0] for line in block.splitlines()[1:]]
            bodies.add(re.sub(r"[%\w.-]+(?= =)|%[\w.-]+", "%", "\n".join(sorted(lines))))
    return len(bodies)


@pytest.mark.parametrize("backend", backend_params(["jax"]))
def test_the_jitted_muon_step_compiles_kernels_per_shape_not_per_matrix(backend):
    # XLA compiles each distinct fused computation once: the kernels must not grow with the
    # matrices of one shape (a slice per matrix is a kernel each: XLA:CPU took minutes for
    # thousands); only the stacks' own kernels depend on the count
    import jax

    import treeopt.jax as tj
    from treeopt.backends import jax_backend

    counts = []
    for count in (jax_backend._CHUNK * 2, jax_backend._CHUNK * 4):
        params = many_matrices(count)
        opt = optim.Muon(0.02)
        step = jax.jit(lambda p, s, g: tj.update(opt, g, s, p), donate_argnums=(0, 1))
        counts.append(distinct_kernels(step.lower(params, tj.init(opt, params), params).compile().as_text()))
    assert max(counts) < 32, counts


def torch_parameters(seed=0):
    import torch

    return {k: torch.nn.Parameter(v) for k, v in tree("torch", "float32", seed).items()}


def muon_steps_on_torch(params, compiled, rebind_at=None):
    """Three Muon steps on torch ``params``; at step ``rebind_at``, every ``.data`` is rebound
    to a copy first (as model surgery or loading a checkpoint does)."""
    opt = optim.Muon(0.02, weight_decay=0.01)
    kernels.enabled = compiled
    try:
        for k, g in enumerate(steps("torch", "float32")):
            if k == rebind_at:
                for p in params.values():
                    p.data = p.data.clone()
            opt.update(params, g)
    finally:
        kernels.enabled = True
    return opt


@pytest.mark.parametrize("backend", backend_params(["torch"]))
def test_muon_on_torch_parameters_takes_the_planned_step_with_the_engines_numbers(backend, monkeypatch):
    # a Parameter's gradient is a plain Tensor: the planned step must accept it, not fall back
    import torch

    from treeopt.kernels import compiled_step

    planned = []
    run = compiled_step._RuleBucket.run
    monkeypatch.setattr(compiled_step._RuleBucket, "run", lambda self, g: planned.append(1) or run(self, g))
    params = torch_parameters()
    originals = dict(params)
    opt = muon_steps_on_torch(params, compiled=True)
    assert planned, "the planned step fell back to the engine on every step"
    assert all(params[k] is originals[k] and params[k].requires_grad for k in params)  # written in place
    assert all(type(slots["v"]) is torch.Tensor for _, slots in opt.store.items())  # the state stays torch's
    general = torch_parameters()
    general_opt = muon_steps_on_torch(general, compiled=False)
    assert_close(params, general, exact=True)
    assert_close(opt.state, general_opt.state, exact=True)


@pytest.mark.parametrize("backend", backend_params(["torch"]))
def test_cpu_torch_muon_after_data_is_rebound_updates_the_new_tensors(backend):
    params, reference = torch_parameters(), torch_parameters()
    muon_steps_on_torch(params, compiled=True, rebind_at=2)
    muon_steps_on_torch(reference, compiled=False, rebind_at=2)
    assert_close(params, reference, exact=True)


@pytest.mark.parametrize("backend", backend_params(["torch"]))
def test_cpu_torch_muon_apply_gradients_returns_new_tensors(backend):
    import torch

    params, grads = tree("torch", "float32"), steps("torch", "float32", 1)[0]
    before = {k: v.clone() for k, v in params.items()}
    new = optim.Muon(0.02).apply_gradients(grads, params)
    assert all(type(v) is torch.Tensor and v.shape == params[k].shape for k, v in new.items())
    assert all(torch.equal(params[k], before[k]) for k in params)  # the inputs are left as they were
    in_place = optim.Muon(0.02)
    in_place.update(params, grads)
    assert_close(new, params, exact=True)
