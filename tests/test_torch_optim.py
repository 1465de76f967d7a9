"""treeopt.torch.Optimizer as a torch.optim.Optimizer: param_groups, state by parameter,
add_param_group, hooks, parameters added later, canonical names, module kinds, both
state-dict layouts."""

import io
import warnings

import pytest

torch = pytest.importorskip("torch", reason="torch adapter tests need torch")
import treeopt as optim  # noqa: E402
import treeopt.torch  # noqa: E402
from treeopt import filters as F  # noqa: E402
from treeopt.multi import RoutingWarning  # noqa: E402

TOKENS = torch.arange(10).repeat(4, 1)
TARGETS = (TOKENS + 1) % 10


class Net(torch.nn.Module):
    """Names that fool the name heuristics: an embedding called ``tok``, a head called ``out``."""

    def __init__(self, tied=False):
        super().__init__()
        torch.manual_seed(0)
        self.tok = torch.nn.Embedding(10, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
        self.scale = torch.nn.LayerNorm(8)
        self.out = torch.nn.Linear(8, 10, bias=False)
        if tied:
            self.out.weight = self.tok.weight

    def forward(self, tokens):
        x = self.tok(tokens)
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return self.out(self.scale(x))


def two_groups():
    return optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(3e-3, weight_decay=0.1)], [F.is_hidden_matrix], names=["muon", "adamw"]
    )


def backward(model):
    loss = torch.nn.functional.cross_entropy(model(TOKENS).reshape(-1, 10), TARGETS.reshape(-1))
    loss.backward()
    return loss.item()


def train(model, opt, steps):
    losses = []
    for _ in range(steps):
        losses.append(backward(model))
        opt.step()
        opt.zero_grad()
    return losses


# ------------------------------------------------------------------------------ param_groups
def test_it_is_a_torch_optimizer_with_one_param_group_per_treeopt_group():
    model = Net()
    opt = treeopt.torch.Optimizer(model, two_groups())
    assert isinstance(opt, torch.optim.Optimizer)
    muon, adamw = opt.param_groups
    assert (muon["name"], muon["lr"], muon["momentum"], muon["weight_decay"]) == ("muon", 0.02, 0.95, 0.01)
    assert (adamw["name"], adamw["lr"], adamw["betas"], adamw["weight_decay"]) == ("adamw", 0.003, (0.9, 0.999), 0.1)
    assert muon["param_names"] == ["blocks.0.weight", "blocks.1.weight"]
    assert [p is model.blocks[0].weight for p in muon["params"]] == [True, False]
    assert sorted(adamw["param_names"]) == [
        "blocks.0.bias",
        "blocks.1.bias",
        "out.weight",
        "scale.bias",
        "scale.weight",
        "tok.weight",
    ]
    assert "lr" in opt.defaults and "weight_decay" in opt.defaults and "betas" not in opt.defaults


def test_group_edits_reach_treeopt_before_the_next_step():
    model = Net()
    opt = treeopt.torch.Optimizer(model, two_groups())
    muon, adamw = opt.optimizer.optimizers
    for step, lr in enumerate([0.01, 0.005, 0.0]):
        for group in opt.param_groups:  # nanoGPT's loop
            group["lr"] = lr * (10 if group["name"] == "muon" else 1)
        opt.param_groups[1]["betas"] = (0.8, 0.99)
        opt.param_groups[0]["momentum"] = 0.9
        backward(model)
        opt.step()
        opt.zero_grad()
        assert float(muon.learning_rate) == pytest.approx(lr * 10) and float(adamw.learning_rate) == pytest.approx(lr)
    assert adamw.betas == (0.8, 0.99) and muon.momentum == 0.9
    before = model.blocks[0].weight.clone()
    backward(model)
    opt.step()  # lr 0: nothing moves
    assert torch.equal(model.blocks[0].weight, before)


def test_edits_equal_the_same_values_set_in_treeopt():
    model_a, model_b = Net(), Net()
    opt_a, opt_b = treeopt.torch.Optimizer(model_a, two_groups()), treeopt.torch.Optimizer(model_b, two_groups())
    for lr in (0.02, 0.013, 0.007):
        opt_a.param_groups[0]["lr"] = lr
        opt_b.optimizer.optimizers[0].learning_rate = lr
        train(model_a, opt_a, 1)
        train(model_b, opt_b, 1)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name


def test_an_edit_of_a_scheduled_value_is_refused_before_anything_changes():
    model = Net()
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(optim.cosine_decay(3e-3, 100))], [F.is_hidden_matrix])
    opt = treeopt.torch.Optimizer(model, multi)
    train(model, opt, 1)
    assert opt.param_groups[1]["lr"] == pytest.approx(optim.cosine_decay(3e-3, 100)(1), rel=1e-6)  # the next value
    opt.param_groups[0]["lr"] = 0.01  # a constant: fine
    opt.param_groups[1]["lr"] = 1e-4
    backward(model)
    weights = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[1\] \(AdamW\): lr .* treeopt schedule"):
        opt.step()
    assert int(multi.step) == 1 and float(multi.optimizers[0].learning_rate) == pytest.approx(0.02)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", -1.0, "finite number >= 0"),
        ("lr", "fast", "finite number"),
        ("betas", (0.9, 1.5), r"\['betas'\]: AdamW beta2 should be in \[0, 1\)"),
        ("nesterov", 0.5, r"param_groups\[1\] \(SGD\)\['nesterov'\] must be True or False"),
    ],
)
def test_bad_edits_name_the_group_and_key(key, value, message):
    model = Net()
    opt = treeopt.torch.Optimizer(
        model, optim.MultiOptimizer([optim.AdamW(1e-3), optim.SGD(0.1, momentum=0.9)], [F.ndim(2)])
    )
    group = opt.param_groups[0] if key in ("lr", "betas") else opt.param_groups[1]
    group[key] = value
    backward(model)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert int(opt.optimizer.step) == 0


# ------------------------------------------------------------------------------ state, hooks, zero_grad
def test_state_is_keyed_by_parameter_and_readable_by_name():
    model = Net()
    opt = treeopt.torch.Optimizer(model, two_groups())
    assert len(opt.state) == 0 and model.blocks[0].weight not in opt.state
    train(model, opt, 2)
    assert len(opt.state) == 8 and set(map(id, opt.state)) == {id(p) for p in model.parameters()}
    assert set(opt.state[model.blocks[0].weight]) == {"v"} and set(opt.state["tok.weight"]) == {"m", "v"}
    slot = opt.state[model.tok.weight]["m"]
    assert slot is opt.optimizer.optimizers[1].state["tok.weight"]["m"]  # the live treeopt slot
    opt.state[model.tok.weight] = {"m": torch.zeros_like(slot), "v": opt.state[model.tok.weight]["v"]}
    assert not slot.any()  # written in place
    with pytest.raises(ValueError, match="shape"):
        opt.state[model.tok.weight] = {"m": torch.zeros(3), "v": torch.zeros(3)}


def test_step_hooks_run_around_every_step():
    model = Net()
    opt = treeopt.torch.Optimizer(model, two_groups())
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", int(o.optimizer.step))))
    handle = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", int(o.optimizer.step))))
    train(model, opt, 2)
    handle.remove()
    train(model, opt, 1)
    assert calls == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2), ("pre", 2)]


def test_zero_grad_reaches_parameters_frozen_by_the_multioptimizer():
    model = Net()
    multi = optim.MultiOptimizer([optim.AdamW(1e-3)], frozen=F.glob("tok.*"))
    opt = treeopt.torch.Optimizer(model, multi)
    assert "tok.weight" not in sum((g["param_names"] for g in opt.param_groups), [])
    backward(model)
    opt.step()
    opt.zero_grad()
    assert model.tok.weight.grad is None


def test_torch_style_parameter_groups_are_refused_at_construction():
    model = Net()
    with pytest.raises(TypeError, match="MultiOptimizer"):
        treeopt.torch.Optimizer([{"params": model.blocks.parameters(), "lr": 0.1}], optim.AdamW(1e-3))


# ------------------------------------------------------------------------------ add_param_group
def test_add_param_group_routes_new_tensors_through_the_plan_or_a_named_group():
    model = Net()
    opt = treeopt.torch.Optimizer(model, two_groups())
    extra = torch.nn.Linear(8, 8)
    opt.add_param_group({"params": [("extra.weight", extra.weight)]})
    temperature = torch.nn.Parameter(torch.ones(()))
    opt.add_param_group({"params": temperature, "name": "adamw", "lr": 0.003})
    assert opt.optimizer.route("extra.weight") == 0 and opt.param_groups[0]["param_names"][-1] == "extra.weight"
    assert opt.param_groups[1]["param_names"][-1] == "added.0" and opt.param_groups[1]["params"][-1] is temperature
    x = torch.randn(4, 8)
    (backward(model), (extra(x).sum() * temperature).backward())
    opt.step()
    assert "extra.weight" in opt.state and temperature in opt.state


def test_add_param_group_refuses_a_split_group_and_a_known_parameter_and_changes_nothing():
    model = Net()
    opt = treeopt.torch.Optimizer(model, two_groups())
    extra = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="whose lr is 0.02, not 0.5"):
        opt.add_param_group({"params": [("extra.weight", extra.weight)], "lr": 0.5})
    with pytest.raises(ValueError, match="no group 'sgd'"):
        opt.add_param_group({"params": [extra.weight], "name": "sgd"})
    with pytest.raises(ValueError, match="'blocks.0.weight' is already in group 'muon'"):
        opt.add_param_group({"params": [model.blocks[0].weight]})
    assert "extra.weight" not in opt.parameters and opt.optimizer.route("extra.weight") is None
    assert sum(len(g["params"]) for g in opt.param_groups) == 8


# ------------------------------------------------------------------------------ parameters added later
def test_a_parameter_added_to_the_model_is_noticed_routed_and_trained():
    model = Net()
    opt = treeopt.torch.Optimizer(model, two_groups())
    train(model, opt, 1)
    model.blocks.append(torch.nn.Linear(8, 8))
    train(model, opt, 1)
    assert opt.optimizer.route("blocks.2.weight") == 0 and "blocks.2.weight" in opt.param_groups[0]["param_names"]
    assert "blocks.2.weight" in opt.state and "blocks.2.bias" in opt.state


def test_a_replaced_parameter_starts_from_fresh_state():
    model = Net()
    opt = treeopt.torch.Optimizer(model, two_groups())
    train(model, opt, 2)
    assert opt.state["out.weight"]["m"].abs().sum() > 0
    model.out = torch.nn.Linear(8, 10, bias=False)
    assert opt.param_groups[1]["params"][opt.param_groups[1]["param_names"].index("out.weight")] is model.out.weight
    backward(model)
    grad = model.out.weight.grad.clone()
    opt.step()
    assert torch.allclose(opt.state["out.weight"]["m"], 0.1 * grad)  # m = (1 - b1) g: no old moments
    assert any("replaced out.weight" in change for change in opt.optimizer.changes)


def test_a_parameter_that_starts_requiring_grad_is_routed_at_the_next_step():
    model = Net()
    model.tok.weight.requires_grad_(False)
    opt = treeopt.torch.Optimizer(model, two_groups())
    train(model, opt, 1)
    assert "tok.weight" not in opt.state and opt.optimizer.route("tok.weight") is None
    model.tok.weight.requires_grad_(True)
    train(model, opt, 1)
    assert "tok.weight" in opt.state and opt.optimizer.route("tok.weight") == 1


def test_the_model_is_walked_again_only_after_a_registration(monkeypatch):
    model = Net()
    opt = treeopt.torch.Optimizer(model, two_groups())
    walks = []
    original = treeopt.torch.optimizer.named_parameters
    monkeypatch.setattr(treeopt.torch.optimizer, "named_parameters", lambda m: walks.append(1) or original(m))
    train(model, opt, 3)
    assert walks == []
    model.blocks[0].weight = torch.nn.Parameter(model.blocks[0].weight.detach().clone())
    train(model, opt, 2)
    assert walks == [1]


# ------------------------------------------------------------------------------ names and kinds
@pytest.mark.parametrize(
    "name, canonical",
    [
        ("_orig_mod.blocks.0.weight", "blocks.0.weight"),
        ("module.blocks.0.weight", "blocks.0.weight"),
        ("module._orig_mod.h.0.w", "h.0.w"),
        ("_orig_mod.module.h.0.w", "h.0.w"),
        ("_fsdp_wrapped_module.h.0._fsdp_wrapped_module._checkpoint_wrapped_module.w", "h.0.w"),
        ("blocks.module.weight", "blocks.module.weight"),
        ("module", "module"),
    ],
)
def test_canonical_names_drop_what_wrappers_insert(name, canonical):
    assert treeopt.torch.canonical_name(name) == canonical


def test_a_compiled_model_has_one_state_per_parameter_under_canonical_names():
    model = Net()
    compiled = torch.compile(model, backend="eager")
    opt = treeopt.torch.Optimizer(compiled, two_groups())
    train(compiled, opt, 2)
    names = [row.path for row in opt.plan().rows]
    assert names == [n for n, _ in model.named_parameters()] and len(opt.state) == 8
    assert not any("_orig_mod" in key for key in opt.state_dict()["tensors"])


def test_an_optimizer_planned_on_wrapper_names_is_refused():
    compiled = torch.compile(Net(), backend="eager")
    multi = two_groups()
    multi.plan(dict(compiled.named_parameters()))
    with pytest.raises(ValueError, match="'_orig_mod.tok.weight'.*wrapper.*treeopt.torch.named_parameters"):
        treeopt.torch.Optimizer(compiled, multi)
    planned = two_groups()
    planned.plan(treeopt.torch.named_parameters(compiled))
    assert treeopt.torch.Optimizer(compiled, planned).optimizer.route("blocks.0.weight") == 0


def test_module_kinds_of_torch_layers():
    assert treeopt.torch.module_kinds(Net()) == {
        "tok.weight": {"embedding"},
        "scale.weight": {"norm"},
        "scale.bias": {"norm"},
        "out.weight": {"head"},
    }
    assert treeopt.torch.module_kinds(Net(tied=True))["tok.weight"] == {"embedding", "head"}


def test_routing_and_muon_guard_know_an_embedding_and_a_head_by_their_module():
    opt = treeopt.torch.Optimizer(Net(), two_groups())
    assert opt.param_groups[0]["param_names"] == ["blocks.0.weight", "blocks.1.weight"]  # not tok, not out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        treeopt.torch.Optimizer(Net(), optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [F.ndim(2)]))
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, RoutingWarning))
    assert len(messages) == 2 and "'out.weight'" in messages[0] and "'tok.weight'" in messages[1]


# ------------------------------------------------------------------------------ state dicts
def test_state_dict_has_torchs_layout_over_the_same_tensors():
    model = Net()
    opt = treeopt.torch.Optimizer(model, two_groups())
    train(model, opt, 2)
    sd = opt.state_dict()
    positions = {name: i for i, name in enumerate(n for g in sd["param_groups"] for n in g["param_names"])}
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3, 4, 5, 6, 7]]
    assert sd["state"][positions["tok.weight"]]["m"] is sd["tensors"]["tok.weight/m"]
    assert sd["param_groups"][1]["treeopt_tensors"]["@adamw/step"] is sd["tensors"]["@adamw/step"]
    assert sd["param_groups"][0]["lr"] == 0.02 and sd["param_groups"][0]["name"] == "muon"


@pytest.mark.parametrize("layout", ["both", "torch only", "torch keyed by name"])
def test_each_layout_loads_by_name_and_resumes_exactly(layout):
    model_a, model_b = Net(), Net()
    opt_a, opt_b = treeopt.torch.Optimizer(model_a, two_groups()), treeopt.torch.Optimizer(model_b, two_groups())
    train(model_a, opt_a, 2)
    train(model_b, opt_b, 2)
    opt_b.param_groups[0]["lr"] = 0.01  # set after the last step: it belongs to the next one
    opt_a.param_groups[0]["lr"] = 0.01
    buffer = io.BytesIO()
    torch.save(opt_b.state_dict(), buffer)
    sd = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    if layout != "both":
        sd = {"state": sd["state"], "param_groups": sd["param_groups"]}
    if layout == "torch keyed by name":  # what set_optimizer_state_dict passes
        names = [n for g in sd["param_groups"] for n in g["param_names"]]
        sd["state"] = {names[i]: slots for i, slots in sd["state"].items()}
        for group in sd["param_groups"]:
            group["params"] = [names[i] for i in group["params"]]
    resumed_model = Net()
    resumed_model.load_state_dict(model_b.state_dict())
    reordered = optim.MultiOptimizer(
        [optim.AdamW(3e-3, weight_decay=0.1), optim.Muon(0.02)],
        [lambda n, p: not F.is_hidden_matrix(n, p)],
        names=["adamw", "muon"],
    )
    resumed = treeopt.torch.Optimizer(resumed_model, reordered)
    report = resumed.load_state_dict(sd)
    assert report.ok and len(report.loaded) == 8
    assert resumed.param_groups[1]["lr"] == 0.01  # muon is group 1 here
    train(model_a, opt_a, 3)
    train(resumed_model, resumed, 3)
    for (name, a), b in zip(model_a.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name


def test_a_foreign_torch_state_dict_is_refused_with_the_reason():
    model = Net()
    reference = torch.optim.AdamW(model.parameters())
    opt = treeopt.torch.Optimizer(model, two_groups())
    with pytest.raises(ValueError, match="not written by treeopt.torch.Optimizer"):
        opt.load_state_dict(reference.state_dict())


def test_a_parameter_added_between_steps_is_unscaled_by_grad_scaler():
    """GradScaler reads param_groups before step(): the new parameter must be there already."""
    model = Net()
    opt = treeopt.torch.Optimizer(model, two_groups())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    train(model, opt, 1)
    model.blocks.append(torch.nn.Linear(8, 8))
    backward(model)
    expected = model.blocks[2].weight.grad.clone()
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(TOKENS).reshape(-1, 10), TARGETS.reshape(-1))
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.testing.assert_close(model.blocks[2].weight.grad, expected)
    scaler.step(opt)
    assert "blocks.2.weight" in opt.state and int(opt.optimizer.step) == 2
