"""Muon reads each weight as its model means it: a layer that stores its weight ``(in, out)``
(Hugging Face's ``Conv1D``, GPT-2's layers) gets ``layout="in_out"`` for that parameter only,
and a stack of experts ``(E, out, in)`` is one matrix per expert. The kinds come from the
framework's modules (treeopt.torch, treeopt.mlx); the router turns them into rule options,
and the parameter's slots follow them (NorMuon keeps one value per neuron of each expert).

The expected numbers come from Keller Jordan's reference Muon (github.com/KellerJordan/Muon:
``muon_update`` and ``zeropower_via_newtonschulz5``) and nanochat's fused step
(tests/muon_references.py), in float64 on the matrix the layer computes with, ``(out, in)``,
one expert at a time."""

import warnings

import numpy as np
import pytest

import treeopt
from muon_references import STEP_GAP, assert_matches, gap, keller, nanochat

torch = pytest.importorskip("torch")
import treeopt.torch  # noqa: E402


def reference_first_step(weight, grad, lr):
    """One step of Keller Jordan's Muon (nesterov, no decay) from zero momentum, on a matrix
    ``(out, in)``: the learning rate scaled by sqrt(max(1, out / in))."""
    return keller(weight, [grad], lr)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("recipe", ["muon_adamw", "muon_alone"])
def test_gpt2_conv1d_weights_are_read_out_in_for_muon(recipe):
    model = tiny_gpt2()
    lr = 0.02
    inner = (
        treeopt.muon_adamw(muon_lr=lr, weight_decay=0.0)
        if recipe == "muon_adamw"
        else treeopt.Muon(lr, weight_decay=0.0)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a lone Muon is given norms and embeddings too
        opt = treeopt.torch.Optimizer(model, inner)
        ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        c_fc = model.transformer.h[0].mlp.c_fc
        assert tuple(c_fc.weight.shape) == (8, 32)  # Conv1D stores (in, out); the layer is (out, in) = (4d, d)
        before = c_fc.weight.detach().double().numpy().T.copy()
        grad = c_fc.weight.grad.double().numpy().T.copy()
        opt.step()
    expected = reference_first_step(before, grad, lr)  # its lr scale: sqrt(32 / 8) = 2
    after = c_fc.weight.detach().double().numpy().T
    np.testing.assert_allclose(after, expected, rtol=0, atol=2e-6)
    unscaled = reference_first_step(before, grad, lr / 2)  # what reading (in, out) as (out, in) gives
    assert np.abs(after - unscaled).max() > 100 * 2e-6
    routes = {keys[-1]: route for keys, route, _ in opt.optimizer.router.table()}
    assert routes["transformer.h.0.mlp.c_fc.weight"].options == (("layout", "in_out"),)
    assert routes["transformer.h.0.ln_1.weight"].options == ()
    rows = {row.path: row for row in opt.plan().rows}
    assert rows["transformer.h.0.mlp.c_fc.weight"].options == {"layout": "in_out"}
    assert "layout=in_out" in str(opt.plan())


def test_a_layout_declared_by_hand_wins_over_the_one_the_kind_implies():
    model = tiny_gpt2()
    multi = treeopt.muon_adamw()
    multi.router.declare_options({"transformer.h.0.mlp.c_fc.weight": {"layout": "out_in"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = treeopt.torch.Optimizer(model, multi)
    routes = {keys[-1]: route for keys, route, _ in opt.optimizer.router.table()}
    assert routes["transformer.h.0.mlp.c_fc.weight"].options == (("layout", "out_in"),)
    assert routes["transformer.h.0.attn.c_attn.weight"].options == (("layout", "in_out"),)


class Experts(torch.nn.Module):
    """A mixture-of-experts layer as Mixtral's and Qwen3-MoE's: a stack (E, out, in), each
    expert applied with F.linear, beside a router."""

    def __init__(self, experts=3, width=6, hidden=10):
        super().__init__()
        self.router = torch.nn.Linear(width, experts, bias=False)
        self.weight = torch.nn.Parameter(torch.randn(experts, hidden, width) / width**0.5)

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        out = torch.zeros(x.shape[:-1] + (self.weight.shape[1],))
        for e in range(self.weight.shape[0]):
            out = out + (choice == e).unsqueeze(-1) * torch.nn.functional.linear(x, self.weight[e])
        return out


class MoE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 6)
        self.experts = Experts()
        self.head = torch.nn.Linear(10, 16)

    def forward(self, ids):
        return self.head(torch.relu(self.experts(self.embed(ids))))


def test_an_expert_stack_is_declared_one_matrix_per_expert():
    torch.manual_seed(0)
    model = MoE()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = treeopt.torch.Optimizer(model, treeopt.muon_adamw())
    router = opt.optimizer.router
    assert router.wanted("experts.weight") == {"batch_axes": 1}
    assert router.wanted("experts.router.weight") == {}
    assert opt.optimizer.names[opt.optimizer.route("experts.weight")] == "muon"


def test_each_expert_is_orthogonalised_alone():
    torch.manual_seed(0)
    model = MoE()
    lr = 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = treeopt.torch.Optimizer(model, treeopt.muon_adamw(muon_lr=lr, weight_decay=0.0))
        ids = torch.randint(0, 16, (4, 5), generator=torch.Generator().manual_seed(2))
        model(ids).square().mean().backward()
        before = model.experts.weight.detach().double().numpy().copy()
        grad = model.experts.weight.grad.double().numpy().copy()
        opt.step()
    expected = np.stack([reference_first_step(w, g, lr) for w, g in zip(before, grad)])
    after = model.experts.weight.detach().double().numpy()
    np.testing.assert_allclose(after, expected, rtol=0, atol=2e-6)
    as_one = reference_first_step(before.reshape(3, -1), grad.reshape(3, -1), lr).reshape(before.shape)
    assert np.abs(after - as_one).max() > 100 * 2e-6  # the stack read as one (E, out * in) matrix


def test_mlx_switch_linear_experts_are_declared_one_matrix_per_expert():
    pytest.importorskip("mlx.core")
    switch = pytest.importorskip("mlx_lm.models.switch_layers")
    import mlx.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.switch_mlp = switch.SwitchGLU(8, 12, 4)
            self.gate = nn.Linear(8, 4, bias=False)
            self.head = nn.Linear(8, 16)

    model = Block()
    multi = treeopt.muon_adamw()
    multi.router.learn(model)
    assert multi.router.wanted("switch_mlp.gate_proj.weight") == {"batch_axes": 1}
    assert multi.router.wanted("gate.weight") == {}


@pytest.mark.parametrize(
    "name, view",
    [("mixtral", {"batch_axes": 1}), ("gpt-oss", {"batch_axes": 1, "layout": "in_out"})],
)
def test_transformers_expert_stacks_are_viewed_as_the_model_stores_them(name, view):
    """Mixtral stores its experts (E, out, in) and applies F.linear; GPT-OSS stores them
    (E, in, out), multiplies ``x @ W[e]`` and says so (``is_transposed``)."""
    pytest.importorskip("transformers")
    import routing_corpus as corpus

    case = next(c for c in corpus.CASES if c.name == name)
    model, _ = case.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = treeopt.torch.Optimizer(model, treeopt.muon_adamw())
    stacks = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert stacks
    for path in stacks:
        assert opt.optimizer.router.wanted(path) == view, path


# ---------------------------------------------------------------- real models, several steps
#: which Muon matrices each architecture stores (in, out), read from its transformers source:
#: GPT-2's Conv1D computes x @ W; Mixtral applies each expert with F.linear(x, W[e]) and its
#: attention and router are nn.Linear; GPT-OSS multiplies x @ W[e] for each expert, and its
#: attention and router are nn.Linear
STORED_IN_OUT = {
    "gpt2": lambda path: True,
    "mixtral": lambda path: False,
    "gpt-oss": lambda path: ".experts." in path,
}


def train(name, preset, steps):
    """The corpus model ``name`` in float64, wrapped as docs/torch.md does, after ``steps``
    steps of the corpus loss: ``(model, optimizer, weights before, every step's gradients)``,
    by name."""
    pytest.importorskip("transformers")
    import routing_corpus as corpus

    model, inputs = next(c for c in corpus.CASES if c.name == name).build()
    model.double()  # the references' precision: any difference left is a different step
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(
            "eager"
        )  # the same products, one expert at a time (grouped_mm takes no float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = treeopt.torch.Optimizer(model, preset)
        params = dict(model.named_parameters())
        before = {n: p.detach().double().numpy().copy() for n, p in params.items()}
        grads = {n: [] for n in params}
        for _ in range(steps):
            opt.zero_grad()
            corpus._torch_loss(model(**inputs)).backward()
            for n, p in params.items():
                grads[n].append(None if p.grad is None else p.grad.double().numpy().copy())
            opt.step()
    return model, opt, before, grads


def per_matrix(reference, name, path, weight, grads):
    """``reference(weight, grads)`` on each matrix of ``weight`` as its layer computes with it,
    ``(out, in)``: one matrix per expert of a stack."""
    flip = STORED_IN_OUT[name](path)

    def one(w, gs):
        return reference(w.T, [g.T for g in gs]).T if flip else reference(w, gs)

    if weight.ndim == 3:
        return np.stack([one(weight[e], [g[e] for g in grads]) for e in range(weight.shape[0])])
    return one(weight, grads)


def weights(model):
    return {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["mixtral", "gpt-oss"])
def test_transformers_expert_stacks_step_as_one_muon_per_expert(name):
    lr = 0.02
    model, _, before, grads = train(name, treeopt.muon_adamw(muon_lr=lr, weight_decay=0.0), steps=2)
    after = weights(model)
    stacks = [n for n, w in after.items() if w.ndim == 3]
    assert len(stacks) == 4  # gate_up_proj and down_proj of two layers
    for path in stacks:
        theirs = per_matrix(lambda w, gs: keller(w, gs, lr), name, path, before[path], grads[path])
        assert_matches(after[path], theirs, before[path])
        start, experts = before[path], before[path].shape[0]
        as_one = keller(start.reshape(experts, -1), [g.reshape(experts, -1) for g in grads[path]], lr)
        assert gap(after[path], as_one.reshape(start.shape), start) > 100 * STEP_GAP  # one (E, out * in) matrix


@pytest.mark.parametrize("name", ["gpt2", "mixtral", "gpt-oss"])
def test_nanochats_recipe_steps_every_matrix_as_its_layer_computes_with_it(name):
    """NorMuon's moments are kept per neuron of each matrix as the layer reads it: per expert,
    over the longer side of (out, in), whatever the layout the weight is stored in."""
    lr = 0.02
    preset = treeopt.muon_adamw(muon_lr=lr, weight_decay=0.0, variant="nanochat")
    model, opt, before, grads = train(name, preset, steps=3)
    multi, after = opt.optimizer, weights(model)
    muon = multi.optimizers[multi.names.index("muon")]
    matrices = [path for path in after if multi.names[multi.route(path)] == "muon"]
    assert len(matrices) >= 8
    for path in matrices:
        theirs = per_matrix(lambda w, gs: nanochat(w, gs, lr), name, path, before[path], grads[path])
        assert_matches(after[path], theirs, before[path])
        shape = before[path].shape
        longer = max(shape[-2:])  # the longer side, whichever way it is stored
        assert tuple(muon.state[path]["second_moment"].shape) == shape[:-2] + (longer,), path


def test_the_plan_and_a_checkpoint_keep_each_experts_view(tmp_path):
    pytest.importorskip("transformers")
    import routing_corpus as corpus

    case = next(c for c in corpus.CASES if c.name == "gpt-oss")
    stack = "model.layers.0.mlp.experts.gate_up_proj"  # stored (E, in, out) = (4, 32, 128)
    model, inputs = case.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = treeopt.torch.Optimizer(model, treeopt.muon_adamw(variant="nanochat"))
        predicted = {row.path: row.state_bytes for row in opt.plan().rows}  # routed, no state yet
        assert predicted[stack] == 4 * (4 * 32 * 128 + 4 * 128)  # momentum; a moment per expert output
        for _ in range(2):
            opt.zero_grad()
            corpus._torch_loss(model(**inputs)).backward()
            opt.step()
        assert {row.path: row.state_bytes for row in opt.plan().rows} == predicted
        resumed, _ = case.build()
        resumed.load_state_dict(model.state_dict())
        again = treeopt.torch.Optimizer(resumed, treeopt.muon_adamw(variant="nanochat"))
        again.load_state_dict(opt.state_dict())
        assert torch.equal(again.state[stack]["second_moment"], opt.state[stack]["second_moment"])
        for m, o in ((model, opt), (resumed, again)):
            o.zero_grad()
            corpus._torch_loss(m(**inputs)).backward()
            o.step()
    for (path, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), path
