"""treeopt.presets: the ``muon_adamw`` preset."""

import re
import warnings

import numpy as np
import pytest

import treeopt
from arrays import make
from routing_helpers import BACKENDS, flat, gpt2, grads_for, slot_paths, three_groups
from treeopt import filters as F
from treeopt.multi import RoutingWarning

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.multi.RoutingWarning")


# ================================================================================ 4. the preset
@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_adamw_routes_hidden_matrices_vectors_and_the_rest(backend):
    params = gpt2(backend)
    params["transformer"]["h"][0]["attn"]["scale"] = make(np.ones(8), backend)  # a vector, neither bias nor norm
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoutingWarning)  # nothing to warn about on GPT-2
        opt = treeopt.muon_adamw(params)
        opt.update(params, grads_for(params, backend, 0))
    assert opt.names == ["muon", "adamw_no_decay", "adamw"]
    expected = {
        "transformer.wte.weight": "adamw",
        "transformer.h.0.ln_1.weight": "adamw_no_decay",
        "transformer.h.0.ln_1.bias": "adamw_no_decay",
        "transformer.h.0.attn.c_attn.weight": "muon",
        "transformer.h.0.attn.c_attn.bias": "adamw_no_decay",
        "transformer.h.0.attn.scale": "adamw_no_decay",
        "transformer.h.0.mlp.c_fc.weight": "muon",
        "transformer.ln_f.weight": "adamw_no_decay",
        "lm_head.weight": "adamw",
    }
    assert {p: opt.names[opt.route(p)] for p in expected} == expected
    plan = opt.plan()
    for row in plan.rows:
        assert row.optimizer == expected[row.path]
        assert row.learning_rate == pytest.approx(0.02 if row.optimizer == "muon" else 3e-4, rel=1e-6)
        assert row.weight_decay == (0.0 if row.optimizer == "adamw_no_decay" else pytest.approx(0.01))
    hyper = {g.name: g.hyperparameters for g in plan.groups}
    assert hyper["muon"]["momentum"] == pytest.approx(0.95)
    assert hyper["adamw"]["betas"] == pytest.approx((0.9, 0.95)) and hyper["adamw"]["bias_correction"] is True
    assert hyper["adamw_no_decay"]["weight_decay"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_adamw_options_and_frozen(backend):
    params = gpt2(backend)
    before = flat(params)
    opt = treeopt.muon_adamw(muon_lr=0.05, adamw_lr=1e-3, frozen=F.is_embedding, max_grad_norm=1.0)
    opt.update(params, grads_for(params, backend, 0))
    assert opt.route("transformer.wte.weight") is None
    assert np.array_equal(flat(params)["transformer.wte.weight"], before["transformer.wte.weight"])
    assert all("transformer.wte.weight" not in slot_paths(s) for s in opt.state["states"])
    rows = {r.path: r for r in opt.plan().rows}
    assert rows["transformer.wte.weight"].optimizer == "frozen"
    assert rows["lm_head.weight"].learning_rate == pytest.approx(1e-3, rel=1e-6)
    assert rows["transformer.h.0.mlp.c_fc.weight"].learning_rate == pytest.approx(0.05, rel=1e-6)
    assert "grad_norm" in opt.state


@pytest.mark.parametrize("how", ["preset", "plan", "init"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameters_can_be_planned_before_the_first_step(backend, how):
    params = gpt2(backend)
    if how == "preset":
        opt = treeopt.muon_adamw(params, frozen=F.is_embedding)
    else:
        opt = three_groups(frozen=F.is_embedding)
        getattr(opt, how)(params)
    assert {r.path: r.optimizer for r in opt.plan().rows}["transformer.wte.weight"] == "frozen"
    assert opt.route("transformer.h.0.attn.c_attn.weight") == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_adamw_prints_its_plan(backend, capsys):
    params = {
        "h": [{"w": make(np.ones((4, 4)), backend), "b": make(np.zeros(4), backend)}],
        "wte": {"weight": make(np.ones((6, 4)), backend)},
    }
    treeopt.muon_adamw(params, print_plan=True)
    out = capsys.readouterr().out
    assert "Routing plan at step 0" in out
    for text in ("h.0.w", "h.0.b", "wte.weight", "muon", "adamw_no_decay"):
        assert text in out


def test_muon_adamw_print_plan_needs_the_params():
    with pytest.raises(ValueError, match=re.escape("muon_adamw(print_plan=True) needs the params")):
        treeopt.muon_adamw(print_plan=True)
