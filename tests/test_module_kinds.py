"""Module kinds: what an integration says a parameter is (embedding, head, norm...), read by
the filters and by Muon's routing guard, whatever the parameter's name."""

import warnings

import numpy as np
import pytest

import treeopt as optim
from treeopt import filters as F
from treeopt.multi import RoutingWarning

W = np.ones((10, 4), np.float32)
PARAMS = {
    "tok": {"weight": W},
    "mid": {"weight": np.ones((4, 4), np.float32)},
    "out": {"weight": W},
    "scale": {"gamma": np.ones(4, np.float32)},
}


def test_declared_kinds_are_seen_by_the_filters_only_inside_the_block():
    assert not F.is_embedding("tok.weight", W) and not F.is_head("out.weight", W)
    with F.module_kinds({"tok.weight": "embedding", "out.weight": ["head"], "scale.gamma": F.NORM}):
        assert F.is_embedding("tok.weight", W) and not F.is_head("tok.weight", W)
        assert F.is_head("out.weight", W) and not F.is_embedding("out.weight", W)
        assert F.is_norm("scale.gamma", W[0])
        assert not F.is_hidden_matrix("tok.weight", W) and not F.is_hidden_matrix("out.weight", W)
        assert F.is_hidden_matrix("mid.weight", W)
    assert not F.is_embedding("tok.weight", W) and F.kinds_of("tok.weight") == frozenset()


def test_a_declared_kind_adds_to_the_name_heuristics_and_never_removes():
    with F.module_kinds({"lm_head.weight": "linear"}):
        assert F.is_head("lm_head.weight", W)
        assert F.kind("linear")("lm_head.weight", W) and not F.kind("conv")("lm_head.weight", W)


def test_nested_blocks_add_to_the_outer_kinds():
    with F.module_kinds({"a": "embedding"}):
        with F.module_kinds({"a": "head", "b": "conv"}):
            assert F.kinds_of("a") == {"embedding", "head"} and F.kinds_of("b") == {"conv"}
        assert F.kinds_of("a") == {"embedding"} and F.kinds_of("b") == frozenset()


def test_bad_kinds_are_refused_with_the_path():
    with pytest.raises(TypeError, match="'tok.weight'"):
        with F.module_kinds({"tok.weight": 3}):
            pass
    with pytest.raises(TypeError, match="kind name"):
        optim.MultiOptimizer([optim.AdamW(1e-3)]).declare_kinds({("tok", "weight"): "embedding"})


def test_a_multioptimizer_routes_by_the_kinds_it_was_told():
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [F.is_hidden_matrix], names=["muon", "adamw"])
    multi.declare_kinds({"tok.weight": "embedding", "out.weight": "head"})
    multi.init(PARAMS)
    assert [multi.route(p) for p in ("tok.weight", "mid.weight", "out.weight")] == [1, 0, 1]
    assert F.kinds_of("tok.weight") == frozenset()  # nothing leaks out of the step


def test_muon_guard_warns_on_a_declared_embedding_and_head():
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [F.ndim(2)])
    multi.declare_kinds({"tok.weight": "embedding", "out.weight": "head"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        multi.init(PARAMS)
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, RoutingWarning))
    assert len(messages) == 2
    assert "'out.weight'" in messages[0] and "output head" in messages[0]
    assert "'tok.weight'" in messages[1] and "embedding" in messages[1]
    notes = {row.path: row.notes for row in multi.plan().rows}
    assert notes["tok.weight"] and notes["out.weight"] and not notes["mid.weight"]


def test_nested_multioptimizers_see_the_outer_kinds():
    inner = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [F.is_hidden_matrix])
    outer = optim.MultiOptimizer([inner, optim.SGD(0.1)], [F.ndim(2)])
    outer.declare_kinds({"tok.weight": "embedding"})
    outer.init(PARAMS)
    assert outer.route("tok.weight") == 0 and inner.route("tok.weight") == 1 and inner.route("mid.weight") == 0
