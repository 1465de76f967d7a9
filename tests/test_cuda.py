"""treeopt on a CUDA device: the accelerator runner (a Triton kernel generated from the rule;
or, when asked, the rule compiled by Inductor) and Muon's stacked, batched step give the
per-tensor rule's numbers there; a training step never waits for the device; state and
checkpoints stay on it.

These need a GPU: CI has none, and ``benchmarks/gpu_check.sh``'s machine runs them. For a dry
run of the file on CPU: ``TREEOPT_TEST_DEVICE=cpu`` (Triton's interpreter runs the same
kernels on CPU tensors; the compiled runner is traced without code generation).
"""

import importlib.util
import os

import pytest

import treeopt as optim
import treeopt.kernels as kernels

from registry import SETTINGS

torch = pytest.importorskip("torch", reason="the CUDA runner is for torch tensors")
torch_compiled = pytest.importorskip("treeopt.backends.torch_compiled", reason="needs torch.compile")
import treeopt.torch  # noqa: E402
from treeopt.kernels.compiled_step import _StackedBucket, _TorchBucket  # noqa: E402
from torch_helpers import TOKENS, Net, leaves, random_tree, train  # noqa: E402

DEVICE = os.environ.get("TREEOPT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device on this machine"
)
SHAPES = {"embed": (50, 16), "blocks": [{"w": (16, 16), "b": (16,)}, {"w": (16, 16), "b": (16,)}], "head": (16, 50)}


@pytest.fixture(autouse=True)
def accelerator_runner(monkeypatch):
    if DEVICE == "cpu":  # a dry run: the accelerator's runner on CPU tensors, interpreted
        if importlib.util.find_spec("triton") is None:
            pytest.skip("the dry run interprets the Triton kernels: Triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(kernels, "torch_runner", "triton")
        monkeypatch.setattr(kernels, "torch_graphs", "always")  # eager on CPU: all but the capture
        monkeypatch.setattr(torch_compiled, "COMPILER", "aot_eager")
    torch._dynamo.reset()


def tree(seed, dtype=torch.float32):
    return random_tree(SHAPES, seed, dtype, DEVICE)


flat = leaves


def run(make, fast, steps=3):
    kernels.enabled = fast
    try:
        params, opt = tree(0), make()
        for i in range(steps):
            opt.update(params, tree(i + 1))
        return params, opt
    finally:
        kernels.enabled = True


ELEMENTWISE = [s for s in SETTINGS if s.make().rule.elementwise and not callable(s.make().rule.slots)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("setting", ELEMENTWISE[::2], ids=lambda s: s.id)
def test_the_cuda_runner_gives_the_per_tensor_rules_numbers(setting, dtype):
    dtype = getattr(torch, dtype)
    kernels.enabled = True
    params, fast = tree(0, dtype), setting.make()
    reference, ref = tree(0, dtype), setting.make()
    for i in range(3):
        fast.update(params, tree(i + 1, dtype))
        kernels.enabled = False
        try:
            ref.update(reference, tree(i + 1, dtype))
        finally:
            kernels.enabled = True
    assert {(type(b), b.kind) for b in fast._compiled.buckets} == {(_TorchBucket, "triton")}
    for x, y in zip(flat(params), flat(reference)):
        assert x.device.type == DEVICE
        if DEVICE == "cpu" and dtype == torch.bfloat16:  # the interpreter truncates to bfloat16
            torch.testing.assert_close(x.float(), y.float(), rtol=0.05, atol=0.05)
        else:  # the rule's operations in its order, rounded as torch rounds them: bit for bit
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def test_the_compile_runner_gives_the_per_tensor_rules_numbers(monkeypatch):
    monkeypatch.setattr(kernels, "torch_runner", "compile")

    def make():
        return optim.AdamW(0.1, bias_correction=True)

    fast_params, fast = run(make, True)
    ref_params, _ = run(make, False)
    assert {b.kind for b in fast._compiled.buckets} == {"compile"}
    for x, y in zip(flat(fast_params), flat(ref_params)):
        # Inductor contracts multiply-adds: a rounding or two over three steps
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_stacked_muon_gives_the_per_matrix_numbers_and_bfloat16_stays_close():
    def make(ns_dtype=None):
        return lambda: optim.MultiOptimizer(
            [optim.Muon(0.02, ns_dtype=ns_dtype), optim.AdamW(1e-3)],
            [lambda p, w: p.startswith("blocks.") and w.ndim == 2],
        )

    fast_params, _ = run(make(), True)
    ref_params, _ = run(make(), False)
    for x, y in zip(flat(fast_params), flat(ref_params)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)  # batched products sum in another order
    start = tree(0)
    low_params, _ = run(make("bfloat16"), True)
    for block in range(2):
        ref_step = ref_params["blocks"][block]["w"] - start["blocks"][block]["w"]
        low_step = low_params["blocks"][block]["w"] - start["blocks"][block]["w"]
        assert low_step.dtype == torch.float32
        assert float(torch.linalg.norm(low_step - ref_step) / torch.linalg.norm(ref_step)) < 0.1


def test_muons_nanochat_recipe_on_the_device_gives_the_cpu_numbers():
    from treeopt.presets import RECIPES

    def make():
        return optim.MultiOptimizer(
            [optim.Muon(0.02, weight_decay=0.5, decoupled_weight_decay=True, **RECIPES["nanochat"]), optim.AdamW(1e-3)],
            [lambda p, w: p.startswith("blocks.") and w.ndim == 2],
        )

    device_params, opt = run(make, True)
    cpu = random_tree(SHAPES, 0, torch.float32, "cpu")
    cpu_opt = make()
    for i in range(3):
        cpu_opt.update(cpu, random_tree(SHAPES, i + 1, torch.float32, "cpu"))
    for x, y in zip(flat(device_params), flat(cpu)):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-4, atol=1e-6)
    assert opt.optimizers[0].state["blocks"][0]["w"]["second_moment"].device.type == DEVICE


def test_muon_replayed_as_a_cuda_graph_follows_its_schedule_with_the_per_matrix_numbers():
    def make():
        return optim.MultiOptimizer(
            [optim.Muon(optim.cosine_decay(0.02, 6), weight_decay=0.01), optim.AdamW(1e-3)],
            [lambda p, w: p.startswith("blocks.") and w.ndim == 2],
        )

    def blocks(n):  # four same-shape matrices, and one alone
        return {"blocks": [{"w": (16, 16), "b": (16,)} for _ in range(4)] + [{"w": (16, 8), "b": (8,)}]}

    shapes = blocks(5)
    fast_params, fast = random_tree(shapes, 0, device=DEVICE), make()
    ref_params, ref = random_tree(shapes, 0, device=DEVICE), make()
    for i in range(6):  # two eager steps, the capture, three replays with new learning rates
        grads = random_tree(shapes, i + 1, device=DEVICE)
        fast.update(fast_params, grads)
        kernels.enabled = False
        try:
            ref.update(ref_params, grads)
        finally:
            kernels.enabled = True
    (stacked,) = [b for b in fast._compiled.buckets if isinstance(b, _StackedBucket)]
    assert (stacked.step.graph is not None) == (DEVICE == "cuda")
    for x, y in zip(flat(fast_params), flat(ref_params)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)  # batched products sum in another order


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no clip", "clip 1.0"])
def test_a_training_step_never_waits_for_the_device(clip):
    model = Net().to(DEVICE)
    opt = treeopt.torch.Optimizer(model, optim.muon_adamw(adamw_lr=1e-2, ns_dtype="bfloat16", max_grad_norm=clip))
    losses = train(model, opt, 30)
    assert losses[-1] < 0.5 * losses[0]
    model(TOKENS.to(DEVICE)).sum().backward()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        opt.step()
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert all(v.device.type == DEVICE for slots in opt.state.values() for v in slots.values())


def test_a_checkpoint_of_a_cuda_model_resumes_on_the_device():
    model_a, model_b = Net().to(DEVICE), Net().to(DEVICE)
    opt_a = treeopt.torch.Optimizer(model_a, optim.muon_adamw())
    train(model_a, opt_a, 5)
    model_b.load_state_dict(model_a.state_dict())
    opt_b = treeopt.torch.Optimizer(model_b, optim.muon_adamw())
    opt_b.load_state_dict(opt_a.state_dict())
    assert all(v.device.type == DEVICE for slots in opt_b.state.values() for v in slots.values())
    train(model_a, opt_a, 3)
    train(model_b, opt_b, 3)
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        # a new optimizer's first step takes the per-tensor path, the running one's the compiled
        # kernels, which contract multiply-adds: a rounding apart, where a lost slot is not
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_gradient_with_other_strides_takes_the_engines_path_with_the_same_numbers():
    def make():
        return optim.AdamW(0.1, bias_correction=True)

    def strided(grads):
        w = grads["blocks"][0]["w"]
        grads["blocks"][0]["w"] = w.t().contiguous().t()  # the same values, column-major
        return grads

    results = []
    for fast in (True, False):
        kernels.enabled = fast
        try:
            params, opt = tree(0), make()
            for i in range(4):
                grads = tree(i + 1)
                opt.update(params, strided(grads) if i == 2 else grads)
            results.append(params)
        finally:
            kernels.enabled = True
        if fast:  # the compiled step takes the layout it was compiled for, and only that
            (bucket,) = opt._compiled.buckets
            assert bucket.prepare(flat(tree(9))) is not None
            assert bucket.prepare(flat(strided(tree(9)))) is None
    for x, y in zip(flat(results[0]), flat(results[1])):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_compact_state_stays_on_the_device_with_the_per_tensor_bytes(state_dtype):
    """muon_adamw with int8 codes or bfloat16 slots: codes, scales and slots live on the
    device, and the planned step (the rule runner around the stored forms) stores the bytes of
    the per-tensor step."""
    precision = optim.StatePrecision(state_dtype, min_size=0)

    def make():
        return optim.MultiOptimizer(
            [optim.Muon(0.02, state_dtype=precision), optim.AdamW(1e-2, weight_decay=0.1, state_dtype=precision)],
            [lambda path, w: path.startswith("blocks") and w.ndim == 2],
        )

    slow_params, slow = run(make, False, steps=4)
    fast_params, fast = run(make, True, steps=4)
    assert fast._compiled is not None
    for x, y in zip(leaves(fast_params), leaves(slow_params)):
        assert torch.equal(x, y)
    for member, reference in zip(fast.groups(), slow.groups()):
        for (keys, slots), (_, expected) in zip(member.group.store.items(), reference.group.store.items()):
            for key, value in slots.items():
                assert value.device == fast_params["embed"].device, (keys, key)
                assert torch.equal(value.view(torch.uint8), expected[key].view(torch.uint8)), (keys, key)
    assert fast.groups()[1].group.store.tree["embed"]["m"].dtype == (
        torch.int8 if state_dtype == "int8" else torch.bfloat16
    )
