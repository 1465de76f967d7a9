"""MultiOptimizer's routing checks: unmatched parameters, filters that match nothing, overlaps,
Muon's guards."""

import re
import warnings

import numpy as np
import pytest

import treeopt as optim
from arrays import as_float64, make
from routing_helpers import BACKENDS, GPT2_PATHS, assert_identical, flat, gpt2, grads_for, messages, small
from treeopt import filters as F
from treeopt.multi import RoutingError, RoutingWarning

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.multi.RoutingWarning")


# ================================================================================ 2. checks
@pytest.mark.parametrize("backend", BACKENDS)
def test_unmatched_parameters_warn_once_per_path(backend):
    params = gpt2(backend)
    multi = optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(3e-4)], [F.is_hidden_matrix], names=["muon", "adamw"], on_unmatched="warn"
    )
    with pytest.warns(RoutingWarning) as record:
        for k in range(3):
            multi.update(params, grads_for(params, backend, k))
    unmatched = [p for p in GPT2_PATHS if not p.endswith(("c_attn.weight", "c_fc.weight"))]
    assert messages(record) == [
        f"'{p}' is accepted by no filter; it goes to the fallback optimizer adamw" for p in unmatched
    ]
    assert [multi.route(p) for p in unmatched] == [1] * len(unmatched)


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_warnings_point_at_the_callers_line(backend):
    params = small(backend)
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [F.is_hidden_matrix], on_unmatched="warn")
    with pytest.warns(RoutingWarning) as record:
        multi.update(params, grads_for(params, backend, 0))
    assert {w.filename for w in record} == {__file__}


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmatched_parameters_as_errors_change_nothing(backend):
    params = gpt2(backend)
    before = flat(params)
    multi = optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(3e-4)], [F.is_hidden_matrix], names=["muon", "adamw"], on_unmatched="error"
    )
    message = (
        "MultiOptimizer: 'transformer.wte.weight' is accepted by no filter; it goes to the fallback optimizer adamw"
    )
    with pytest.raises(RoutingError, match=re.escape(message)) as error:
        multi.update(params, grads_for(params, backend, 0))
    assert isinstance(error.value, ValueError)
    assert_identical(flat(params), before)
    for state in multi.state["states"]:
        assert sorted(state) == ["learning_rate", "step"] and int(as_float64(state["step"])) == 0
    assert [multi.route(p) for p in GPT2_PATHS] == [None] * len(GPT2_PATHS)
    assert multi.plan().rows == []
    with pytest.raises(RoutingError, match=re.escape(message)):
        multi.plan(params)  # planning routes too, with the same check


def test_check_options_are_validated():
    for option, value in (("on_unmatched", "ignore"), ("guards", "loud")):
        with pytest.raises(ValueError, match=f"MultiOptimizer: {option} must be one of"):
            optim.MultiOptimizer([optim.SGD(0.1), optim.SGD(0.1)], [F.everything], **{option: value})
    with pytest.raises(ValueError, match=r"Muon allow should name some of \('vectors', 'embeddings', 'heads'\)"):
        optim.Muon(0.02, allow=["matrices"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_filter_that_matches_nothing_warns_once(backend):
    params = gpt2(backend)
    multi = optim.MultiOptimizer(
        [optim.SGD(0.1), optim.Muon(0.02), optim.AdamW(3e-4)],
        [F.glob("encoder.*"), F.is_hidden_matrix],
        names=["sgd", "muon", "adamw"],
    )
    with pytest.warns(RoutingWarning) as record:
        for k in range(3):
            multi.update(params, grads_for(params, backend, k))
    assert messages(record) == [
        "MultiOptimizer: filters[0] (glob('encoder.*')) matches no parameter, so sgd updates nothing"
    ]
    assert multi.plan().warnings == ["filters[0] (glob('encoder.*')) matches no parameter"]
    assert "* filters[0] (glob('encoder.*')) matches no parameter" in str(multi.plan())


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlaps_list_every_accepting_filter_winner_first(backend):
    params = gpt2(backend)
    multi = optim.MultiOptimizer(
        [optim.Muon(0.02), optim.SGD(0.1), optim.Adam(1e-3), optim.AdamW(1e-3)],
        [F.is_hidden_matrix, F.ndim(2), F.glob("*.weight")],
    )
    plan = multi.plan(params)
    assert multi.overlaps() == {
        "transformer.wte.weight": [1, 2],
        "transformer.h.0.attn.c_attn.weight": [0, 1, 2],
        "transformer.h.0.mlp.c_fc.weight": [0, 1, 2],
        "lm_head.weight": [1, 2],
    }
    also = {r.path: r.also_matched for r in plan.rows}
    assert also == {
        "transformer.wte.weight": (2,),
        "transformer.h.0.ln_1.weight": (),
        "transformer.h.0.ln_1.bias": (),
        "transformer.h.0.attn.c_attn.weight": (1, 2),
        "transformer.h.0.attn.c_attn.bias": (),
        "transformer.h.0.mlp.c_fc.weight": (1, 2),
        "transformer.ln_f.weight": (),
        "lm_head.weight": (2,),
    }
    assert "also matched filters[1, 2]" in str(plan)


GUARD_TEXT = {
    "vector": "Muon got a 1-D tensor: it orthogonalises matrices (route vectors and scalars to AdamW, or "
    "Muon(allow=['vectors']))",
    "embedding": "Muon got what looks like an embedding (use AdamW, or Muon(allow=['embeddings']))",
    "head": "Muon got what looks like an output head (use AdamW, or Muon(allow=['heads']))",
}


def guarded_model(backend):
    return {
        "embed": {"weight": make(np.ones((6, 4)), backend)},
        "transformer": {"wte": {"weight": make(np.ones((6, 4)), backend)}},
        "blocks": [{"w": make(np.eye(4), backend), "ln_1": {"weight": make(np.ones(4), backend)}}],
        "lm_head": {"weight": make(np.ones((6, 4)), backend)},
    }


GUARDED = {
    "embed.weight": "embedding",
    "transformer.wte.weight": "embedding",
    "blocks.0.w": None,
    "blocks.0.ln_1.weight": "vector",
    "lm_head.weight": "head",
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_guards_warn_once_and_show_in_the_plan(backend):
    params = guarded_model(backend)
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [F.everything])
    with pytest.warns(RoutingWarning) as record:
        for k in range(2):
            multi.update(params, grads_for(params, backend, k))
    assert messages(record) == [f"'{p}': {GUARD_TEXT[kind]}" for p, kind in GUARDED.items() if kind]
    notes = {r.path: r.notes for r in multi.plan().rows}
    assert notes == {p: (GUARD_TEXT[kind],) if kind else () for p, kind in GUARDED.items()}
    assert [multi.route(p) for p in GUARDED] == [0] * len(GUARDED)  # a warning only: Muon still gets them


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_guards_as_errors_change_nothing(backend):
    params = guarded_model(backend)
    before = flat(params)
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [F.everything], guards="error")
    with pytest.raises(RoutingError, match=re.escape(f"MultiOptimizer: 'embed.weight': {GUARD_TEXT['embedding']}")):
        multi.update(params, grads_for(params, backend, 0))
    assert_identical(flat(params), before)
    assert [multi.route(p) for p in GUARDED] == [None] * len(GUARDED)
    assert [int(as_float64(s["step"])) for s in multi.state["states"]] == [0, 0]
    for kind, path, model in (
        ("vector", "x.w", {"x": {"w": make(np.ones(4), backend)}}),
        ("head", "lm_head.weight", {"lm_head": {"weight": make(np.ones((6, 4)), backend)}}),
        ("embedding", "transformer.wte.weight", {"transformer": {"wte": {"weight": make(np.ones((6, 4)), backend)}}}),
    ):
        strict = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [F.everything], guards="error")
        with pytest.raises(RoutingError, match=re.escape(f"MultiOptimizer: '{path}': {GUARD_TEXT[kind]}")):
            strict.update(model, grads_for(model, backend, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_guards_are_silenced_by_off_or_allow(backend):
    params = guarded_model(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoutingWarning)
        off = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [F.everything], guards="off")
        off.update(params, grads_for(params, backend, 0))
        allowed = optim.MultiOptimizer(
            [optim.Muon(0.02, allow=["vectors", "embeddings", "heads"]), optim.AdamW(3e-4)],
            [F.everything],
            guards="error",
        )
        allowed.update(params, grads_for(params, backend, 0))
    assert [off.route(p) for p in GUARDED] == [0] * len(GUARDED)
    assert all(r.notes == () for r in allowed.plan().rows)
    partly = optim.MultiOptimizer([optim.Muon(0.02, allow="vectors"), optim.AdamW(3e-4)], [F.everything])
    with pytest.warns(RoutingWarning) as record:
        partly.update(params, grads_for(params, backend, 0))
    assert messages(record) == [
        f"'{p}': {GUARD_TEXT[kind]}" for p, kind in GUARDED.items() if kind in ("embedding", "head")
    ]
