"""MultiOptimizer's changes during training: freeze, unfreeze, new parameters, reroute."""

import numpy as np
import pytest

import treeopt as optim
from arrays import as_float64, make
from routing_helpers import (
    BACKENDS,
    GPT2_PATHS,
    assert_identical,
    flat,
    gpt2,
    grads_for,
    slot_paths,
    small,
    three_groups,
)
from treeopt import filters as F

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.multi.RoutingWarning")


# ================================================================================ 7. changes
@pytest.mark.parametrize("backend", BACKENDS)
def test_freeze_keeps_values_and_state_and_unfreeze_resumes(backend):
    params = small(backend)
    multi = optim.MultiOptimizer([optim.AdamW(1e-2), optim.SGD(0.1, momentum=0.9)], [F.ndim(2)], names=["adamw", "sgd"])
    for k in range(2):
        multi.update(params, grads_for(params, backend, k))
    path = "layers.0.attn.weight"
    assert multi.freeze(path) == [path] and multi.freeze(path) == []  # already frozen: no change
    value, slots = flat(params)[path], flat(multi.state["states"][0])
    for k in range(2, 4):
        multi.update(params, grads_for(params, backend, k))
    assert np.array_equal(flat(params)[path], value)
    assert_identical(flat(multi.state["states"][0]), {**slots, "step": np.float64(4.0)})  # state kept as it was
    assert not np.array_equal(flat(params)["layers.0.attn.bias"], flat(small(backend))["layers.0.attn.bias"])
    plan = multi.plan()
    assert [(r.path, r.optimizer) for r in plan.rows if r.path == path] == [(path, "frozen")]
    assert multi.route(path) is None
    assert multi.unfreeze(path) == [path]
    grads = grads_for(params, backend, 4)
    multi.update(params, grads)
    m_expected = 0.9 * slots[f"{path}.m"] + 0.1 * as_float64(grads["layers"][0]["attn"]["weight"])
    np.testing.assert_allclose(flat(multi.state["states"][0])[f"{path}.m"], m_expected, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(flat(params)[path], value) and multi.route(path) == 0
    assert multi.changes == [f"step 2: froze {path}", f"step 4: unfroze {path}"]
    plan = multi.plan()
    assert plan.changes == multi.changes and f"* step 2: froze {path}" in str(plan)
    assert [r.optimizer for r in plan.rows if r.path == path] == ["adamw"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_freeze_selects_by_paths_or_filter(backend):
    params = gpt2(backend)
    multi = three_groups()
    multi.update(params, grads_for(params, backend, 0))
    assert multi.freeze(F.is_bias) == ["transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.bias"]
    assert multi.freeze(F.ndim(2) & F.glob("transformer.h.*")) == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.mlp.c_fc.weight",
    ]
    assert multi.freeze(["lm_head.weight", ("transformer", "wte", "weight")]) == [
        "lm_head.weight",
        "transformer.wte.weight",
    ]
    frozen = flat(params)
    multi.update(params, grads_for(params, backend, 1))
    for path in GPT2_PATHS:
        assert np.array_equal(flat(params)[path], frozen[path]) == (
            path not in ("transformer.h.0.ln_1.weight", "transformer.ln_f.weight")
        ), path
    assert multi.unfreeze(F.everything) == [  # in tree order
        "transformer.wte.weight",
        "transformer.h.0.ln_1.bias",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.mlp.c_fc.weight",
        "lm_head.weight",
    ]
    assert multi.changes[0] == "step 1: froze transformer.h.0.ln_1.bias, transformer.h.0.attn.c_attn.bias"
    with pytest.raises(KeyError, match="no known parameter 'nope'"):
        multi.freeze("nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unfreeze_a_parameter_frozen_by_the_frozen_filter(backend):
    params = gpt2(backend)
    multi = three_groups(frozen=F.is_embedding)
    multi.update(params, grads_for(params, backend, 0))
    before = flat(params)["transformer.wte.weight"]
    assert multi.unfreeze("transformer.wte.weight") == ["transformer.wte.weight"]
    multi.update(params, grads_for(params, backend, 1))
    assert multi.route("transformer.wte.weight") == 2
    assert not np.array_equal(flat(params)["transformer.wte.weight"], before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_parameters_are_routed_and_initialised_on_their_first_step(backend):
    params = gpt2(backend)
    multi = three_groups()
    for k in range(2):
        multi.update(params, grads_for(params, backend, k))
    before = multi.plan()
    attn = params["transformer"]["h"][0]["attn"]
    attn["lora_a"] = make(np.full((2, 8), 0.1), backend)
    attn["lora_b"] = make(np.zeros((24, 2)), backend)
    attn["lora_scale"] = make(np.ones(2), backend)
    grads = grads_for(params, backend, 2)
    multi.update(params, grads)
    new = ["transformer.h.0.attn.lora_a", "transformer.h.0.attn.lora_b", "transformer.h.0.attn.lora_scale"]
    assert [multi.route(p) for p in new] == [0, 0, 2]  # two hidden matrices to Muon, a vector to the fallback
    assert set(new[:2]) <= set(slot_paths(multi.state["states"][0]))
    assert new[2] in slot_paths(multi.state["states"][2])
    # SGD with momentum, first step from a zero buffer: p - lr * g
    g = as_float64(grads["transformer"]["h"][0]["attn"]["lora_scale"]).astype(np.float32)
    assert np.array_equal(as_float64(attn["lora_scale"]), (np.float32(1) - np.float32(0.1) * g).astype(np.float64))
    after = multi.plan()
    diff = before.diff(after)
    assert (diff.added, diff.removed, diff.moved, diff.changed) == (new, [], [], [])
    assert str(diff).splitlines() == [f"+ {p}" for p in new]
    assert [r.path for r in after.rows][-3:] == new  # first seen last


@pytest.mark.parametrize("backend", BACKENDS)
def test_reroute_with_reset_starts_from_zero_slots(backend):
    params = small(backend)
    multi = optim.MultiOptimizer([optim.AdamW(1e-2), optim.SGD(0.1, momentum=0.9)], [F.ndim(2)], names=["adamw", "sgd"])
    for k in range(2):
        multi.update(params, grads_for(params, backend, k))
    path = "layers.0.attn.weight"
    assert multi.reroute(path, to="sgd") == [path] and multi.reroute(path, to=1) == []  # already there
    assert multi.route(path) == 1
    assert path not in slot_paths(multi.state["states"][0])
    plan = multi.plan(params)
    assert [r.optimizer for r in plan.rows if r.path == path] == ["sgd"]
    assert np.array_equal(flat(multi.state["states"][1])[f"{path}.v"], np.zeros((4, 4)))
    assert multi.changes == [f"step 2: rerouted {path} from adamw to sgd, state reset"] == plan.changes
    value = flat(params)[path].astype(np.float32)
    grads = grads_for(params, backend, 2)
    multi.update(params, grads)
    g = as_float64(grads["layers"][0]["attn"]["weight"]).astype(np.float32)
    assert np.array_equal(flat(params)[path], (value - np.float32(0.1) * g).astype(np.float64))
    with pytest.raises(IndexError, match="reroute: there is no optimizer 5"):
        multi.reroute(path, to=5)
    with pytest.raises(ValueError, match="reroute: state must be 'reset' or 'carry', got 'keep'"):
        multi.reroute(path, to=0, state="keep")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reroute_to_an_unknown_name(backend):
    params = small(backend)
    multi = optim.MultiOptimizer([optim.AdamW(1e-2), optim.SGD(0.1)], [F.ndim(2)], names=["adamw", "sgd"])
    multi.update(params, grads_for(params, backend, 0))
    with pytest.raises(IndexError, match="reroute: there is no optimizer 'adam'"):
        multi.reroute("layers.0.attn.weight", to="adam")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reroute_with_carry_from_adamw_to_adam_keeps_the_moments(backend):
    params = small(backend)
    multi = optim.MultiOptimizer([optim.AdamW(1e-2), optim.Adam(1e-2)], [F.ndim(2)], names=["adamw", "adam"])
    for k in range(2):
        multi.update(params, grads_for(params, backend, k))
    path = "layers.0.attn.weight"
    m, v = flat(multi.state["states"][0])[f"{path}.m"], flat(multi.state["states"][0])[f"{path}.v"]
    assert multi.reroute(path, to="adam", state="carry") == [path]
    assert multi.changes == [f"step 2: rerouted {path} from adamw to adam, carrying m, v"]
    plan = multi.plan(params)
    assert [r.optimizer for r in plan.rows if r.path == path] == ["adam"] and plan.changes == multi.changes
    adam_state = flat(multi.state["states"][1])
    assert np.array_equal(adam_state[f"{path}.m"], m) and np.array_equal(adam_state[f"{path}.v"], v)
    # the next step continues from them
    grads = grads_for(params, backend, 2)
    multi.update(params, grads)
    g = as_float64(grads["layers"][0]["attn"]["weight"])
    np.testing.assert_allclose(flat(multi.state["states"][1])[f"{path}.m"], 0.9 * m + 0.1 * g, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(
        flat(multi.state["states"][1])[f"{path}.v"], 0.999 * v + 0.001 * g * g, rtol=1e-5, atol=1e-9
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_reroute_with_carry_from_adamw_to_sgd_carries_nothing_that_does_not_fit(backend):
    params = small(backend)
    multi = optim.MultiOptimizer([optim.AdamW(1e-2), optim.SGD(0.1, momentum=0.9)], [F.ndim(2)], names=["adamw", "sgd"])
    for k in range(2):
        multi.update(params, grads_for(params, backend, k))
    path = "layers.0.attn.weight"
    multi.reroute(path, to="sgd", state="carry")
    multi.plan(params)
    assert np.array_equal(flat(multi.state["states"][1])[f"{path}.v"], np.zeros((4, 4)))
    assert "carrying" not in multi.changes[-1]
