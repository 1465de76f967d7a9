"""The torch runners that need no numba and no compiler give the per-tensor rule's numbers:
torch's foreach operations driven by the traced rule (CPU without numba, accelerators without
Triton), and the Triton kernel generated from the rule, run here by Triton's interpreter on
CPU tensors (on a GPU: tests/test_cuda.py)."""

import importlib.util
import warnings

import numpy as np
import pytest

import treeopt as optim
import treeopt.kernels as kernels
from treeopt.kernels import compiled_step
from treeopt.kernels.expression import TraceError, trace
from treeopt.rules.base import Rule
from treeopt.tree import tree_flatten

from registry import SETTINGS

torch = pytest.importorskip("torch", reason="the runners are for torch tensors")
from treeopt.backends import torch_foreach  # noqa: E402
from treeopt.kernels.compiled_step import _TorchBucket  # noqa: E402
from torch_helpers import leaves, random_tree  # noqa: E402

SHAPES = {"embed": (7, 5), "blocks": [{"w": (5, 5), "b": (5,)}, {"w": (5, 3), "b": (3,)}], "scale": (), "big": (300,)}
ELEMENTWISE = [s for s in SETTINGS if s.make().rule.elementwise and not callable(s.make().rule.slots)]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run(make, fast, dtype, steps=3, between=None):
    kernels.enabled = fast
    try:
        params, opt = random_tree(SHAPES, 0, dtype), make()
        for i in range(steps):
            if between:
                between(opt, i)
            opt.update(params, random_tree(SHAPES, i + 1, dtype))
        return params, opt
    finally:
        kernels.enabled = True


def assert_identical(fast, ref):
    for x, y in zip(leaves(fast), leaves(ref)):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


@pytest.fixture
def foreach(monkeypatch):
    monkeypatch.setattr(kernels, "torch_runner", "foreach")
    monkeypatch.setattr(torch_foreach, "CHUNK_ELEMENTS", 64)  # "big" is cut into pieces


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("setting", ELEMENTWISE, ids=lambda s: s.id)
def test_the_foreach_runner_gives_the_per_tensor_rules_numbers_bit_for_bit(setting, dtype, foreach):
    fast_params, fast = run(setting.make, True, DTYPES[dtype])
    ref_params, ref = run(setting.make, False, DTYPES[dtype])
    assert {(type(b), b.kind) for b in fast._compiled.buckets} == {(_TorchBucket, "foreach")}
    assert_identical(fast_params, ref_params)
    fast_state, ref_state = tree_flatten(fast.state), tree_flatten(ref.state)
    assert [k for k, _ in fast_state] == [k for k, _ in ref_state]
    for (key, x), (_, y) in zip(fast_state, ref_state):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=key)


def test_groups_with_their_own_learning_rates_share_one_foreach_step(foreach):
    def make():
        return optim.MultiOptimizer(
            [optim.AdamW(0.1, bias_correction=True), optim.AdamW(optim.cosine_decay(0.01, 5), weight_decay=0.1)],
            [lambda p, w: w.ndim == 2],
        )

    def lower(opt, i):
        if i == 2:
            opt.optimizers[0].learning_rate = 0.05

    fast_params, fast = run(make, True, torch.float32, steps=4, between=lower)
    ref_params, _ = run(make, False, torch.float32, steps=4, between=lower)
    (bucket,) = fast._compiled.buckets
    assert bucket.kind == "foreach" and len(bucket.owners) == 2
    assert_identical(fast_params, ref_params)


def test_a_cpu_torch_user_without_numba_gets_the_foreach_runner_and_one_hint(monkeypatch):
    monkeypatch.setattr(compiled_step, "numba_available", lambda: False)
    monkeypatch.setattr(compiled_step, "_hinted", False)
    params, opt = random_tree(SHAPES, 0), optim.AdamW(1e-3)
    with pytest.warns(UserWarning, match=r"pip install numba"):
        for i in range(2):
            opt.update(params, random_tree(SHAPES, i + 1))
    assert {b.kind for b in opt._compiled.buckets} == {"foreach"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        optim.AdamW(1e-3).update(random_tree(SHAPES, 0), random_tree(SHAPES, 1))


def test_the_plan_computes_in_place_where_a_value_is_dead_and_never_in_the_gradient():
    from treeopt.rules.adam import ADAMW

    program = trace(ADAMW, (), ())
    instructions, temps, outputs = torch_foreach.plan(program)
    assert outputs == [1, 2, 3]  # the parameter and both moments end in their own tensors
    assert temps <= 2  # (1 - b1) g and g * g, then the denominator
    assert all(i.out != 0 for i in instructions)  # register 0, the gradient, is never written


def test_a_rule_that_branches_on_a_number_cannot_be_traced():
    def update(grad, param, v, lr):
        if lr > 0:
            return param - lr * grad, v
        return param, v

    def coefficients(lr, step):
        return {"lr": lr}

    with pytest.raises(TraceError, match="branch"):
        trace(Rule("branchy", update, coefficients, slots=("v",)), (), ())


@pytest.fixture
def triton_interpreter(monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (it comes with torch's CUDA wheels on Linux)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "torch_runner", "triton")


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("setting", ELEMENTWISE[::2], ids=lambda s: s.id)
def test_the_triton_kernel_gives_the_per_tensor_rules_numbers(setting, dtype, triton_interpreter):
    fast_params, fast = run(setting.make, True, DTYPES[dtype])
    ref_params, _ = run(setting.make, False, DTYPES[dtype])
    assert {(type(b), b.kind) for b in fast._compiled.buckets} == {(_TorchBucket, "triton")}
    if dtype == "bfloat16":
        # Triton's interpreter truncates float32 to bfloat16 (the GPU rounds to nearest, as
        # torch): an ulp apart per step there; tests/test_cuda.py checks it bit for bit on a GPU
        for x, y in zip(leaves(fast_params), leaves(ref_params)):
            torch.testing.assert_close(x.float(), y.float(), rtol=0.05, atol=0.05)
    else:
        assert_identical(fast_params, ref_params)


def test_the_triton_kernel_takes_new_learning_rates_and_groups_without_a_new_kernel(triton_interpreter):
    def make():
        return optim.MultiOptimizer(
            [optim.AdamW(0.1, bias_correction=True), optim.Adam(optim.cosine_decay(0.01, 5))],
            [lambda p, w: w.ndim == 2],
        )

    def lower(opt, i):
        if i == 2:
            opt.optimizers[0].learning_rate = 0.05

    fast_params, fast = run(make, True, torch.float32, steps=4, between=lower)
    ref_params, _ = run(make, False, torch.float32, steps=4, between=lower)
    assert {b.kind for b in fast._compiled.buckets} == {"triton"}
    assert_identical(fast_params, ref_params)


def test_the_generated_kernel_is_the_rule_in_its_order():
    from treeopt.backends.program import Operand
    from treeopt.rules.adam import ADAMW

    program = trace(ADAMW, (), ())
    # the rule's AdamW: p * decay first, then Adam's moments, then the step
    assert program.nodes[0].op == "mul" and program.nodes[0].args[0] == Operand("param")
    assert [n.op for n in program.nodes].count("sqrt") == 1
    assert np.array_equal([o.kind for o in program.outputs], ["node", "node", "node"])


def test_muon_stacked_for_a_cuda_graph_runs_eagerly_on_cpu_with_the_per_matrix_numbers(monkeypatch):
    monkeypatch.setattr(kernels, "torch_graphs", "always")  # on CPU: everything but the capture
    shapes = {"blocks": [{"w": (6, 6), "b": (6,)} for _ in range(3)] + [{"w": (6, 4), "b": (4,)}]}

    def make():
        return optim.MultiOptimizer(
            [optim.Muon(optim.cosine_decay(0.02, 5), weight_decay=0.01), optim.AdamW(1e-3)],
            [lambda p, w: w.ndim == 2],
        )

    def train(fast):
        kernels.enabled = fast
        try:
            params, opt = random_tree(shapes, 0), make()
            for i in range(5):
                opt.update(params, random_tree(shapes, i + 1))
            return params, opt
        finally:
            kernels.enabled = True

    (fast_params, fast), (ref_params, _) = train(True), train(False)
    (stacked,) = [b for b in fast._compiled.buckets if type(b).__name__ == "_StackedBucket"]
    assert stacked.step.graph is None and stacked.step.eager_steps == 4  # planned after step 1
    for x, y in zip(leaves(fast_params), leaves(ref_params)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)  # batched products sum in another order
