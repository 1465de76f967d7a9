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
