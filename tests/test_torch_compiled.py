"""The torch runner for accelerators (the rule over a group's tensors as one torch.compile'd
step), run on CPU: the same numbers as the per-tensor rule, learning-rate changes without a
new plan, fused groups, and a fall-back on a wrong gradient."""

import pytest

import treeopt as optim
import treeopt.kernels as kernels

from registry import SETTINGS

torch = pytest.importorskip("torch", reason="the runner is for torch tensors")
torch_compiled = pytest.importorskip("treeopt.backends.torch_compiled", reason="needs torch.compile")
from treeopt.kernels.compiled_step import _TorchBucket  # noqa: E402
from torch_helpers import leaves, random_tree  # noqa: E402

SHAPES = {"embed": (7, 5), "blocks": [{"w": (5, 5), "b": (5,)}, {"w": (5, 3), "b": (3,)}], "scale": ()}


def tree(seed, dtype=torch.float32):
    return random_tree(SHAPES, seed, dtype)


flat = leaves


def run(make, fast, dtype=torch.float32, steps=3, between=None):
    kernels.enabled = fast
    try:
        params, opt = tree(0, dtype), make()
        for i in range(steps):
            if between:
                between(opt, i)
            opt.update(params, tree(i + 1, dtype))
        return params, opt
    finally:
        kernels.enabled = True


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "torch_runner", "compile")
    monkeypatch.setattr(torch_compiled, "COMPILER", "aot_eager")  # the same trace, no code generation
    torch._dynamo.reset()


def assert_same(fast, ref):
    # torch's own CPU sqrt (the compiled step's) is off by an ulp for some inputs; the per-tensor
    # rule uses a correctly rounded one on CPU: a few ulps apart at most
    for x, y in zip(flat(fast), flat(ref)):
        torch.testing.assert_close(x, y, rtol=5e-7, atol=1e-8)


ELEMENTWISE = [s for s in SETTINGS if s.make().rule.elementwise and not callable(s.make().rule.slots)]


@pytest.mark.parametrize("setting", ELEMENTWISE[::3], ids=lambda s: s.id)
def test_the_compiled_runner_equals_the_per_tensor_rule(setting, compiled_on_cpu):
    fast_params, fast = run(setting.make, True)
    ref_params, _ = run(setting.make, False)
    assert {type(b) for b in fast._compiled.buckets} == {_TorchBucket}
    assert_same(fast_params, ref_params)


def test_groups_share_one_compiled_step_and_learning_rates_change_without_a_new_plan(compiled_on_cpu):
    def make():
        return optim.MultiOptimizer(
            [optim.AdamW(0.1, bias_correction=True), optim.AdamW(0.01, weight_decay=0.0)], [lambda p, w: w.ndim == 2]
        )

    def lower(opt, i):
        if i == 2:
            opt.optimizers[0].learning_rate = 0.05

    fast_params, fast = run(make, True, steps=4, between=lower)
    ref_params, _ = run(make, False, steps=4, between=lower)
    (bucket,) = fast._compiled.buckets
    assert isinstance(bucket, _TorchBucket) and len(bucket.owners) == 2
    assert_same(fast_params, ref_params)


def test_a_wrong_gradient_falls_back_to_the_engine_error(compiled_on_cpu):
    params, opt = tree(0), optim.Adam(0.1)
    opt.update(params, tree(1))
    opt.update(params, tree(2))
    before = [x.clone() for x in flat(params)]
    bad = tree(3)
    bad["blocks"][0]["w"] = torch.zeros(4, 4)
    with pytest.raises(Exception, match="blocks.0.w"):
        opt.update(params, bad)
    assert_same(flat(params), before)


@pytest.mark.slow
def test_inductor_code_gives_the_per_tensor_numbers(monkeypatch):
    monkeypatch.setattr(kernels, "torch_runner", "compile")
    torch._dynamo.reset()

    def make():
        return optim.AdamW(0.1, bias_correction=True)

    fast_params, _ = run(make, True)
    ref_params, _ = run(make, False)
    assert_same(fast_params, ref_params)
