"""treeopt in a PyTorch training loop: treeopt.torch.Optimizer."""

import io

import pytest

torch = pytest.importorskip("torch", reason="torch adapter tests need torch")
from torch_helpers import TARGETS, TOKENS, Net, train  # noqa: E402

import treeopt as optim  # noqa: E402
import treeopt.torch  # noqa: E402


def hidden_matrix(name, param):
    return name.startswith("blocks.") and param.ndim == 2


def muon_adamw():
    return optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [hidden_matrix])


def test_training_loop_updates_parameters_in_place_and_loss_goes_down():
    model = Net()
    weight = model.blocks[0].weight
    opt = treeopt.torch.Optimizer(model, muon_adamw())
    losses = train(model, opt, 30)
    assert losses[-1] < 0.5 * losses[0]
    assert model.blocks[0].weight is weight  # the same Parameter, written in place
    assert opt.optimizer.route("blocks.0.weight") == 0 and opt.optimizer.route("blocks.0.bias") == 1
    assert opt.optimizer.route("embed.weight") == 1 and opt.optimizer.route("head.weight") == 1
    assert all(p.grad is None for p in model.parameters())


def test_matches_treeopt_on_the_same_tensors():
    model_a, model_b = Net(), Net()
    opt_a = treeopt.torch.Optimizer(model_a, muon_adamw())
    opt_b = muon_adamw()
    train(model_a, opt_a, 3)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model_b(TOKENS).reshape(-1, 10), TARGETS.reshape(-1))
        loss.backward()
        params = dict(model_b.named_parameters())
        with torch.no_grad():
            opt_b.update(params, {n: p.grad for n, p in params.items()})
        model_b.zero_grad()
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(a, b), name


def test_frozen_parameters_and_missing_gradients_are_skipped():
    model = Net()
    model.norm.weight.requires_grad_(False)
    opt = treeopt.torch.Optimizer(model, optim.Adam(0.01))
    before_norm, before_head = model.norm.weight.clone(), model.head.weight.clone()
    model(TOKENS).sum().backward()
    model.head.weight.grad = None  # no gradient this step
    opt.step()
    assert torch.equal(model.norm.weight, before_norm) and torch.equal(model.head.weight, before_head)
    assert "norm.weight" not in opt.state and "head.weight" not in opt.state
    assert "embed.weight" in opt.state and int(opt.optimizer.step) == 1


def test_tied_weights_are_updated_once():
    tied, untied = Net(tied=True), Net(tied=True)
    opt = treeopt.torch.Optimizer(tied, optim.SGD(0.1))
    assert "head.weight" not in opt.parameters and "embed.weight" in opt.parameters
    tied(TOKENS).sum().backward()
    grad = tied.embed.weight.grad.clone()
    opt.step()
    assert torch.allclose(tied.embed.weight, untied.embed.weight - 0.1 * grad)
    assert tied.head.weight is tied.embed.weight


def test_zero_grad_keeps_or_drops_gradients():
    model = Net()
    opt = treeopt.torch.Optimizer(model, optim.SGD(0.1))
    model(TOKENS).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_closure_is_called_and_its_loss_returned():
    model = Net()
    opt = treeopt.torch.Optimizer(model, optim.SGD(0.1))

    def closure():
        opt.zero_grad()
        loss = model(TOKENS).square().mean()
        loss.backward()
        return loss

    assert opt.step(closure).item() > 0


def test_state_dict_round_trip_by_name_resumes_exactly():
    model_a, model_b = Net(), Net()
    opt_a, opt_b = treeopt.torch.Optimizer(model_a, muon_adamw()), treeopt.torch.Optimizer(model_b, muon_adamw())
    train(model_a, opt_a, 2)
    train(model_b, opt_b, 2)
    buffer = io.BytesIO()
    torch.save(opt_b.state_dict(), buffer)
    state_dict = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert "blocks.0.weight/v" in state_dict["tensors"] and "embed.weight/m" in state_dict["tensors"]
    reordered = optim.MultiOptimizer([optim.AdamW(3e-3), optim.Muon(0.02)], [lambda n, p: not hidden_matrix(n, p)])
    resumed = treeopt.torch.Optimizer(model_b, reordered)
    report = resumed.load_state_dict(state_dict)
    assert report.ok and len(report.loaded) == 8
    train(model_a, opt_a, 3)
    train(model_b, resumed, 3)
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(a, b), name


def test_works_with_a_compiled_model():
    model = Net()
    compiled = torch.compile(model, backend="eager")
    opt = treeopt.torch.Optimizer(compiled, muon_adamw())
    assert "blocks.0.weight" in opt.parameters  # names without torch.compile's prefix
    losses = train(compiled, opt, 20)
    assert losses[-1] < 0.6 * losses[0]
    assert opt.optimizer.route("blocks.1.weight") == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_state_stays_on_the_parameters_device():
    model = Net().cuda()
    opt = treeopt.torch.Optimizer(model, muon_adamw())
    train(model, opt, 2)
    assert len(opt.state) == len(list(model.parameters()))
    for param, slots in opt.state.items():
        assert all(v.device == param.device for v in slots.values())
    assert opt.optimizer.optimizers[1].state["embed.weight"]["m"].device == model.embed.weight.device
