"""treeopt.torch.state_dict: ``treeopt.torch.Optimizer.state_dict`` is the checkpoint's content,
saved by ``torch.save`` and ``torch.distributed.checkpoint`` and loaded strictly, by name."""

import pytest

import treeopt as optim
from arrays import as_float64
from checkpoint_helpers import assert_bit_identical, needs_torch, numpy_of, state_by_key
from treeopt import checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.RoutingWarning")


# ------------------------------------------------------------------------------ 6. MLX and torch interoperability
def _torch_setup(seed=0):
    import torch

    import treeopt.torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )
    opt = treeopt.torch.Optimizer(
        model,
        optim.MultiOptimizer(
            [optim.Muon(0.02), optim.AdamW(optim.cosine_decay(3e-3, 10))],
            [lambda path, w: w.ndim == 2 and path in ("0.weight", "2.weight")],
            names=["hidden", "rest"],
        ),
    )
    return model, opt


def _torch_steps(model, opt, start, steps):
    import torch

    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _torch_resumed(model, load):
    """A fresh model with ``model``'s weights and a fresh optimizer, its state loaded by ``load``."""
    fresh_model, fresh_opt = _torch_setup(seed=1)
    fresh_model.load_state_dict(model.state_dict())
    load(fresh_opt)
    return fresh_model, fresh_opt


def _same_torch_training(model_a, opt_a, model_b, opt_b):
    _torch_steps(model_a, opt_a, 3, 3)
    _torch_steps(model_b, opt_b, 3, 3)
    assert_bit_identical(
        {k: v.numpy().copy() for k, v in model_a.state_dict().items()},
        {k: v.numpy().copy() for k, v in model_b.state_dict().items()},
    )
    assert_bit_identical(state_by_key(opt_a.optimizer), state_by_key(opt_b.optimizer))


@needs_torch
def test_torch_state_dict_is_the_checkpoint_content_and_torch_save_loads_it_weights_only(tmp_path):
    import torch

    model, opt = _torch_setup()
    _torch_steps(model, opt, 0, 3)
    state = opt.state_dict()
    tensors, metadata = checkpoint.to_flat(opt.optimizer)
    assert set(state) == {"tensors", "metadata", "state", "param_groups"}  # treeopt's content and torch's layout
    assert set(state["tensors"]) == set(tensors) and state["metadata"] == metadata
    assert {"0.weight/v", "2.weight/v", "4.weight/m", "0.bias/v", "@hidden/step", "@rest/learning_rate"} <= set(tensors)
    assert all(isinstance(v, torch.Tensor) for v in state["tensors"].values())
    path = tmp_path / "opt.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["metadata"] == metadata
    assert_bit_identical(
        {k: v.numpy() for k, v in loaded["tensors"].items()}, {k: numpy_of(v) for k, v in tensors.items()}
    )

    def load(fresh_opt):
        report = fresh_opt.load_state_dict(loaded)
        assert report.ok, str(report)

    model_b, opt_b = _torch_resumed(model, load)
    assert int(as_float64(opt_b.optimizer.step)) == 3
    _same_torch_training(model, opt, model_b, opt_b)


@needs_torch
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_torch_distributed_checkpoint_in_one_process(tmp_path):
    import torch.distributed.checkpoint as dcp

    model, opt = _torch_setup()
    _torch_steps(model, opt, 0, 3)
    folder = tmp_path / "dcp"
    dcp.save(opt.state_dict(), checkpoint_id=str(folder))  # no process group needed

    def load(fresh_opt):
        fresh_opt.init()
        template = fresh_opt.state_dict()
        assert template["metadata"]["step"] == 0
        dcp.load(template, checkpoint_id=str(folder))
        assert template["metadata"]["step"] == 3
        report = fresh_opt.load_state_dict(template)
        assert report.ok, str(report)

    model_b, opt_b = _torch_resumed(model, load)
    assert_bit_identical(state_by_key(opt_b.optimizer), state_by_key(opt.optimizer))
    _same_torch_training(model, opt, model_b, opt_b)


@needs_torch
def test_torch_load_state_dict_is_strict_and_by_name(tmp_path):
    import torch

    model, opt = _torch_setup()
    _torch_steps(model, opt, 0, 3)
    state = opt.state_dict()
    # another model: one more layer, so "4.weight" becomes a hidden matrix of other shape
    bigger = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    import treeopt.torch

    other = treeopt.torch.Optimizer(
        bigger,
        optim.MultiOptimizer(
            [optim.Muon(0.02), optim.AdamW(optim.cosine_decay(3e-3, 10))],
            [lambda path, w: w.ndim == 2 and path in ("0.weight", "2.weight")],
            names=["hidden", "rest"],
        ),
    )
    with pytest.raises(checkpoint.CheckpointError) as caught:
        other.load_state_dict(state)
    assert {(p.kind, p.path) for p in caught.value.report.problems} == {
        ("shape", "4.weight/m"),
        ("shape", "4.weight/v"),
        ("shape", "4.bias/m"),
        ("shape", "4.bias/v"),
    }
    report = other.load_state_dict(state, strict=False)
    assert sorted(report.loaded) == ["0.bias", "0.weight", "2.bias", "2.weight"]


@needs_torch
def test_torch_round_trip_with_a_parameter_that_had_no_gradient_yet():
    import torch

    import treeopt.torch

    def setup():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 2), "unused": torch.nn.Linear(4, 2)})
        return model, treeopt.torch.Optimizer(model, optim.AdamW(1e-3))

    model, opt = setup()
    model["used"](torch.randn(3, 4)).sum().backward()
    opt.step()
    state = opt.state_dict()
    _, fresh = setup()
    assert fresh.load_state_dict(state).ok


# ------------------------------------------------------------------------------ resume as torch.optim resumes
def _continued_alike(run, uninterrupted, resumed, start, stop):
    """Both runs go on from ``start`` to ``stop`` with ``run(model, opt, start, stop)`` and
    end with the same state and weights, bit for bit."""
    for model, opt in (uninterrupted, resumed):
        run(model, opt, start, stop)
    assert_bit_identical(state_by_key(resumed[1].optimizer), state_by_key(uninterrupted[1].optimizer))
    for a, b in zip(uninterrupted[0].parameters(), resumed[0].parameters()):
        assert a.equal(b)


def _groups_without_params(opt):
    return [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in opt.param_groups]


@needs_torch
@pytest.mark.parametrize("strict", [True, False])
def test_load_restores_the_group_values_torch_optim_restores(strict):
    """The reference is torch.optim.SGD driven the same way: values written into the groups
    (nanochat writes Muon's momentum and weight decay every step), and an edit of the saved
    dict before the load (the usual way to change the rate on resume)."""
    import torch

    import treeopt.torch

    def pair():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        ours = treeopt.torch.Optimizer(
            model,
            optim.MultiOptimizer(
                [optim.SGD(0.1, momentum=0.9), optim.SGD(0.01, momentum=0.5)],
                [lambda path, w: path.startswith("0.")],
                names=["first", "second"],
            ),
        )
        theirs = torch.optim.SGD(
            [{"params": model[0].parameters(), "lr": 0.1, "momentum": 0.9}, {"params": model[1].parameters()}],
            lr=0.01,
            momentum=0.5,
        )
        return model, ours, theirs

    model, ours, theirs = pair()
    model(torch.ones(3, 4)).sum().backward()
    for opt in (ours, theirs):
        opt.param_groups[0]["momentum"] = 0.8515
        opt.param_groups[1]["weight_decay"] = 0.25
        opt.param_groups[1]["lr"] = 0.005
        opt.step()
    saved_ours, saved_theirs = ours.state_dict(), theirs.state_dict()
    for saved in (saved_ours, saved_theirs):
        saved["param_groups"][0]["lr"] = 0.02  # changed on resume, in the dict
    _, fresh_ours, fresh_theirs = pair()
    fresh_theirs.load_state_dict(saved_theirs)
    assert fresh_ours.load_state_dict(saved_ours, strict=strict).ok
    keys = ("lr", "momentum", "weight_decay")
    for mine, reference in zip(fresh_ours.param_groups, fresh_theirs.param_groups):
        assert {k: mine[k] for k in keys} == {k: reference[k] for k in keys}
    first, second = fresh_ours.optimizer.optimizers
    assert (first.momentum, float(first.learning_rate)) == (0.8515, pytest.approx(0.02))
    assert (second.weight_decay, float(second.learning_rate)) == (0.25, pytest.approx(0.005))


@needs_torch
def test_a_resumed_run_that_writes_momentum_each_step_equals_the_uninterrupted_one():
    """nanochat's loop: Muon's momentum and weight decay written into param_groups at every
    step; resumed by state_dict/load_state_dict, as its base_train.py does."""

    def loop(model, opt, start, stop):
        for step in range(start, stop):
            for group in opt.param_groups:
                if group["name"] == "hidden":
                    group["momentum"] = min(step / 300, 1) * 0.1 + 0.85
                    group["weight_decay"] = 0.01 * (1 - step / 10)
            _torch_steps(model, opt, step, 1)

    model, opt = _torch_setup()
    loop(model, opt, 0, 3)
    saved = opt.state_dict()
    fresh_model, fresh_opt = _torch_resumed(model, lambda o: o.load_state_dict(saved))
    assert fresh_opt.param_groups[0]["momentum"] == opt.param_groups[0]["momentum"] != 0.95
    _continued_alike(loop, (model, opt), (fresh_model, fresh_opt), 3, 6)


@needs_torch
def test_name_keyed_content_alone_restores_the_saved_hyperparameters():
    model, opt = _torch_setup()
    opt.param_groups[0]["momentum"] = 0.9
    _torch_steps(model, opt, 0, 2)
    saved = opt.state_dict()
    _, fresh = _torch_resumed(
        model, lambda o: o.load_state_dict({"tensors": saved["tensors"], "metadata": saved["metadata"]})
    )
    assert fresh.param_groups[0]["momentum"] == 0.9 and fresh.optimizer.optimizers[0].momentum == 0.9


@needs_torch
def test_a_layer_frozen_since_the_save_keeps_its_state_for_when_it_is_unfrozen():
    """Saved with every layer training, resumed with one frozen (requires_grad off): a
    strict load takes its state, the frozen steps leave it, and unfreezing continues as a run
    that froze and unfroze the same layer without a checkpoint."""

    def run(model, opt, start, stop):
        for step in range(start, stop):
            model[2].weight.requires_grad_(not 3 <= step < 5)
            _torch_steps(model, opt, step, 1)

    model, opt = _torch_setup()
    run(model, opt, 0, 3)
    saved = opt.state_dict()

    def load(fresh):
        fresh.model[2].weight.requires_grad_(False)
        assert fresh.load_state_dict(saved).ok

    fresh_model, fresh_opt = _torch_resumed(model, load)
    assert fresh_model[2].weight in fresh_opt.state
    _continued_alike(run, (model, opt), (fresh_model, fresh_opt), 3, 7)


@needs_torch
@pytest.mark.parametrize("name", ["#grad_norm", "@adamw", "@hidden/step", "~x", "~#y", "a/b", "~~@z"])
def test_any_parameter_name_round_trips(tmp_path, name):
    """Names that look like the format's own keys (``@`` scalars, ``#`` whole-model state)
    are escaped on save: what was saved loads, in a file and through the torch layout."""
    import torch

    import treeopt.torch

    def setup():
        torch.manual_seed(0)
        params = [(name, torch.nn.Parameter(torch.randn(3, 3))), ("other", torch.nn.Parameter(torch.randn(3)))]
        multi = optim.MultiOptimizer(
            [optim.Muon(0.02), optim.AdamW(1e-2)], [lambda path, w: w.ndim == 2], names=["hidden", "adamw"]
        )
        return params, treeopt.torch.Optimizer(params, multi)

    params, opt = setup()
    for _ in range(2):
        for _, p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    checkpoint.save(opt.optimizer, tmp_path / "opt.safetensors")
    saved = opt.state_dict()
    torch.save(saved, tmp_path / "opt.pt")
    for load in (
        lambda fresh, p: checkpoint.load(fresh.optimizer, tmp_path / "opt.safetensors", params=dict(p)),
        lambda fresh, p: fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True)),
        lambda fresh, p: fresh.load_state_dict({"state": saved["state"], "param_groups": saved["param_groups"]}),
    ):
        fresh_params, fresh = setup()
        assert load(fresh, fresh_params).ok
        assert_bit_identical(state_by_key(fresh.optimizer), state_by_key(opt.optimizer))
