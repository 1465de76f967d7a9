"""MultiOptimizer: first-match routing decided once from the parameter, structure kept,
per-group learning rates, errors that name the filter and the path."""

import copy
import dataclasses
from collections import namedtuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import treeopt as optim
from treeopt.tree import tree_flatten, tree_map

from arrays import as_float64, backend_params, make

Pair = namedtuple("Pair", "first second")


def f32(*values):
    return np.array(values, dtype=np.float32)


def ones_like(tree):
    return tree_map(lambda p: np.ones_like(p), tree)


def is_matrix(path, weight):
    return weight.ndim == 2


def model():
    return {
        "embed": np.ones((5, 3), np.float32),
        "layers": [
            {"weight": np.full((3, 3), 0.5, np.float32), "bias": np.zeros(3, np.float32)},
            {},
            {"weight": np.full((3, 2), 0.2, np.float32), "bias": np.zeros(2, np.float32)},
        ],
    }


def test_constructor_checks_the_number_of_filters():
    for optimizers, filters, needed in (
        ([], [], -1),
        ([optim.SGD(0.1)] * 2, [], 1),
        ([optim.SGD(0.1)], [is_matrix], 0),
    ):
        with pytest.raises(ValueError, match=f"Given {len(filters)} filters but {needed} needed."):
            optim.MultiOptimizer(optimizers, filters)
    with pytest.raises(TypeError, match=r"filters\[0\] is a str"):
        optim.MultiOptimizer([optim.SGD(0.1), optim.SGD(0.1)], ["ndim == 2"])
    with pytest.raises(TypeError, match=r"optimizers\[1\] is a float"):
        optim.MultiOptimizer([optim.SGD(0.1), 0.1], [is_matrix])


def test_each_parameter_goes_to_the_first_accepting_filter():
    multi = optim.MultiOptimizer([optim.Adam(0.1), optim.SGD(0.1)], [is_matrix])
    multi.init(model())
    adam, sgd = multi.state["states"]
    assert set(adam["layers"][0]) == {"weight"} and set(sgd["layers"][0]) == {"bias"}
    assert "embed" in adam and "embed" not in sgd
    assert multi.route("layers.2.bias") == 1 and multi.route(("layers", 0, "weight")) == 0
    assert multi.route("nowhere") is None


def test_routes_are_decided_once_from_the_parameter():
    calls = []

    def by_dtype_and_value(path, weight):
        calls.append(path)
        return weight.dtype == np.float32 and float(weight.sum()) > 0  # changes as training moves it

    multi = optim.MultiOptimizer([optim.SGD(1.0), optim.SGD(1.0, momentum=0.5)], [by_dtype_and_value])
    params = {"a": f32(1.0), "b": f32(-1.0)}
    for _ in range(4):
        multi.update(params, {"a": f32(1.0), "b": f32(-1.0)})  # "a" goes negative, "b" positive
    assert sorted(calls) == ["a", "b"]  # called once per path, never again
    assert multi.route("a") == 0 and multi.route("b") == 1
    params["c"] = f32(3.0)
    multi.update(params, {"a": f32(0.0), "b": f32(0.0), "c": f32(1.0)})
    assert sorted(calls) == ["a", "b", "c"] and multi.route("c") == 0


def test_a_single_optimizer_behaves_exactly_like_it():
    params_a, params_b = model(), model()
    alone, multi = optim.AdamW(0.01), optim.MultiOptimizer([optim.AdamW(0.01)])
    for _ in range(3):
        alone.update(params_a, ones_like(params_a))
        multi.update(params_b, ones_like(params_b))
    for (path, a), (_, b) in zip(tree_flatten(params_a), tree_flatten(params_b)):
        assert np.array_equal(a, b), path
    assert tree_flatten(alone.state)[2:] and [k for k, _ in tree_flatten(alone.state)] == [
        k for k, _ in tree_flatten(multi.state["states"][0])
    ]


def test_structure_is_kept_whatever_the_number_of_optimizers():
    params = {
        "pair": Pair(np.ones((2, 2), np.float32), f32(2)),
        "t": (f32(3), np.ones((2, 2), np.float32)),
        "blocks": {"0": f32(4), "1": np.ones((1, 1), np.float32)},
        "a.b": f32(6),
        7: np.ones((2, 1), np.float32),
        "empty": {},
        "zs": [],
        "last": f32(1),
    }
    grads = tree_map(lambda p: np.ones_like(p), params)
    multi = optim.MultiOptimizer([optim.SGD(0.1), optim.Adam(0.1)], [is_matrix])
    new = multi.apply_gradients(grads, params)
    assert list(new) == list(params)
    assert type(new["pair"]) is Pair and type(new["t"]) is tuple and new["empty"] == {} and new["zs"] == []
    assert list(new["blocks"]) == ["0", "1"] and isinstance(new["blocks"], dict)
    for state in multi.state["states"]:
        assert type(state["pair"]) is Pair and type(state["t"]) is tuple


def test_step_and_learning_rates():
    multi = optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(3e-4), optim.Adafactor()], [is_matrix, lambda p, w: w.ndim == 1]
    )
    with pytest.warns(optim.RoutingWarning, match="'embed': Muon got what looks like an embedding"):
        multi.update(model(), ones_like(model()))
    assert int(multi.step) == 1
    muon_lr, adamw_lr, adafactor_lr = multi.learning_rate
    assert float(muon_lr) == pytest.approx(0.02) and float(adamw_lr) == pytest.approx(3e-4) and adafactor_lr is None
    multi.learning_rate = [0.01, 1e-4, None]
    assert [float(lr) for lr in multi.learning_rate[:2]] == pytest.approx([0.01, 1e-4])
    with pytest.raises(TypeError, match=r"optimizers\[i\].learning_rate"):
        multi.learning_rate = 0.1
    with pytest.raises(ValueError, match="3 optimizers but got 2"):
        multi.learning_rate = [0.1, 0.2]


def test_a_filter_that_matches_nothing_leaves_an_empty_group_that_still_steps():
    multi = optim.MultiOptimizer([optim.SGD(0.1), optim.Adam(0.1)], [lambda path, w: path.startswith("nothing")])
    with pytest.warns(optim.RoutingWarning, match=r"filters\[0\] \(<lambda>\) matches no parameter"):
        multi.update(model(), ones_like(model()))
    sgd_state = multi.state["states"][0]
    assert int(sgd_state["step"]) == 1
    assert not [k for k, _ in tree_flatten(sgd_state) if k not in ("step", "learning_rate")]


def test_a_filter_that_raises_names_itself_and_the_path_and_changes_nothing():
    def by_rank(path, weight):
        if path == "layers.2.bias":
            raise KeyError("rank")
        return weight.ndim == 2

    multi = optim.MultiOptimizer([optim.SGD(0.1), optim.SGD(0.1)], [by_rank])
    params = model()
    with pytest.raises(
        optim.RoutingError, match=r"filters\[0\] \(by_rank\) raised KeyError: 'rank' on 'layers.2.bias'"
    ):
        multi.update(params, ones_like(params))
    assert [int(s["step"]) for s in multi.state["states"]] == [0, 0]
    assert multi.route("layers.0.weight") is None  # no route was kept from the failed step
    assert np.array_equal(params["embed"], model()["embed"])


def test_state_reads_are_live_and_writes_are_kept():
    multi = optim.MultiOptimizer([optim.SGD(0.1), optim.Adam(0.1)], [is_matrix])
    assert multi.state is multi.state
    multi.state["note"] = "kept"
    assert multi.state["note"] == "kept"
    with pytest.raises(ValueError, match="2 optimizers but the state holds 1 states"):
        multi.state = {"states": [{}]}
    with pytest.raises(ValueError, match=r"states\[1\]: .*missing 'step'"):
        multi.state = {"states": [multi.optimizers[0].state, {}]}


def test_nested_multi_optimizers_route_with_full_paths():
    inner = optim.MultiOptimizer([optim.SGD(0.1), optim.SGD(0.2)], [lambda path, w: path.endswith("bias")])
    outer = optim.MultiOptimizer([optim.Adam(0.1), inner], [lambda path, w: path == "embed"])
    params = model()
    outer.update(params, ones_like(params))
    np.testing.assert_allclose(params["layers"][0]["bias"], -0.1 * np.ones(3))
    np.testing.assert_allclose(params["layers"][0]["weight"], 0.3 * np.ones((3, 3)))
    assert inner.route("layers.0.bias") == 0 and outer.route("layers.0.bias") == 1


def test_routers_are_the_multi_optimizers_inside_by_position():
    plain = optim.SGD(0.1)
    inner = optim.MultiOptimizer([optim.SGD(0.1), optim.SGD(0.2)], [lambda path, w: path.endswith("bias")])
    outer = optim.MultiOptimizer([optim.Adam(0.1), inner], [lambda path, w: path == "embed"])
    assert plain.router.routers() == []
    assert outer.router.routers() == [((), outer.router), ((1,), inner.router)]
    plain.router.note("replaced w")  # a plain optimizer keeps no log
    outer.router.note("replaced w")
    assert outer.changes == ["step 0: replaced w"]


def test_routes_are_a_copy_and_a_restored_route_moves_the_parameter_without_its_state():
    multi = optim.MultiOptimizer([optim.SGD(0.1, momentum=0.9), optim.Adam(0.1)], [is_matrix])
    params = model()
    multi.update(params, ones_like(params))
    routes = multi.routes()
    keys = ("layers", 0, "weight")
    assert routes[keys].group == 0 and list(routes)[0] == ("embed",)
    routes.clear()
    assert multi.routes()  # the copy changed, not the optimizer
    sgd, adam = multi.optimizers
    assert "v" in sgd.state["layers"][0]["weight"]
    multi.router.restore(keys, dataclasses.replace(multi.routes()[keys], group=1, reason="rerouted"))
    assert multi.route("layers.0.weight") == 1 and sgd.state["layers"][0]["weight"] == {}
    multi.update(params, ones_like(params))
    assert set(adam.state["layers"][0]["weight"]) == {"m", "v"}  # a fresh state on its new optimizer


def test_parameterless_layers_mlx_regression_4215():
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(0.01)], [is_matrix])
    params = {
        "layers": [
            {"weight": np.eye(3, dtype=np.float32), "bias": f32(1, 1, 1)},
            {},
            {"weight": np.eye(3, dtype=np.float32)},
        ]
    }
    before = copy.deepcopy(params)
    for _ in range(2):
        multi.update(params, ones_like(params))
    assert not np.array_equal(params["layers"][0]["weight"], before["layers"][0]["weight"])
    assert not np.array_equal(params["layers"][0]["bias"], before["layers"][0]["bias"])


@pytest.mark.parametrize("backend", backend_params())
def test_numbers_match_mlx_multioptimizer(backend):
    mx = pytest.importorskip("mlx.core")
    import mlx.optimizers as mlx_optim

    rng = np.random.default_rng(0)
    shapes = {"embed": (6, 4), "w1": (4, 4), "b1": (4,), "head": (4, 3)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(5)]

    def build(module):
        return module.MultiOptimizer(
            [module.Muon(0.02), module.AdamW(0.01, weight_decay=0.0), module.AdamW(0.01)],
            [lambda path, w: w.ndim == 2 and path.startswith("w"), lambda path, w: w.ndim == 1],
        )

    reference, ours = build(mlx_optim), build(optim)
    mlx_params = {k: mx.array(v) for k, v in params.items()}
    our_params = {k: make(v, backend) for k, v in params.items()}
    for g in grads:
        mlx_params = reference.apply_gradients({k: mx.array(v) for k, v in g.items()}, mlx_params)
        ours.update(our_params, {k: make(v, backend) for k, v in g.items()})
    for key in shapes:
        np.testing.assert_allclose(as_float64(our_params[key]), np.array(mlx_params[key]), rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------- properties
names = st.sampled_from(["a", "b", "w", "bias", "0", "1", "x.y"])
leaf_shapes = st.sampled_from([(), (2,), (3,), (2, 2), (2, 3), (1, 2, 2)])
trees = st.recursive(
    leaf_shapes.map(lambda s: np.zeros(s, np.float32)),
    lambda children: st.one_of(
        st.dictionaries(names, children, max_size=3),
        st.lists(children, max_size=3),
        st.lists(children, max_size=2).map(tuple),
    ),
    max_leaves=8,
).filter(lambda t: isinstance(t, (dict, list, tuple)))  # a tree, not a single array
predicates = [
    ("matrix", lambda path, w: w.ndim >= 2),
    ("vector", lambda path, w: w.ndim == 1),
    ("under a", lambda path, w: path.startswith("a")),
    ("digit", lambda path, w: any(part.isdigit() for part in path.split("."))),
    ("never", lambda path, w: False),
]


# a drawn filter may match nothing in a drawn tree: that warning is test_multi_checks' subject
@pytest.mark.filterwarnings("ignore:.*matches no parameter:treeopt.RoutingWarning")
@settings(max_examples=60, deadline=None)
@given(trees, st.lists(st.sampled_from(range(len(predicates))), min_size=0, max_size=3))
def test_routing_is_first_match_and_each_group_steps_as_its_optimizer_alone(tree, chosen):
    filters = [predicates[i][1] for i in chosen]
    learning_rates = [0.5 + i for i in range(len(filters) + 1)]  # a distinct step per group
    multi = optim.MultiOptimizer([optim.SGD(lr) for lr in learning_rates], filters)
    params = tree_map(lambda p: p.copy(), tree)
    grads = tree_map(lambda p: np.ones_like(p), tree)
    new = multi.apply_gradients(grads, params)
    assert tree_map(lambda p: type(p).__name__, new) == tree_map(lambda p: type(p).__name__, grads)
    for (path, old), (_, value) in zip(tree_flatten(params), tree_flatten(new)):
        expected = next((i for i, f in enumerate(filters) if f(path, old)), len(filters))
        np.testing.assert_allclose(value, old - learning_rates[expected])


def test_route_options_reach_the_rule_per_parameter():
    """A layout declared for one path (a Conv1D stored (in, out)) changes only that
    parameter's update, on every runner; a rule that takes no such option ignores it."""
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(4, 6)).astype(np.float32), "c": rng.normal(size=(6, 4)).astype(np.float32)}
    params["b"] = np.zeros(4, np.float32)
    grads = [tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]

    def reference(layout, path):  # Muon with this layout for every parameter, on one of them
        opt, value = optim.Muon(0.02, layout=layout), {path: params[path].copy()}
        for g in grads:
            value = opt.apply_gradients({path: g[path]}, value)
        return value[path]

    for make_optimizer in (
        lambda: optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [is_matrix]),
        lambda: optim.Muon(0.02),
    ):
        opt, values = make_optimizer(), copy.deepcopy(params)
        opt.router.declare_options({"c": {"layout": "in_out"}, "b": {"layout": "in_out"}})
        chosen = {k: v for k, v in values.items() if k != "b" or isinstance(opt, optim.MultiOptimizer)}
        for g in grads:
            opt.update(chosen, {k: g[k] for k in chosen})
        np.testing.assert_array_equal(values["c"], reference("in_out", "c"))
        np.testing.assert_array_equal(values["a"], reference("out_in", "a"))
        assert not np.array_equal(reference("in_out", "c"), reference("out_in", "c"))  # the option matters
        if isinstance(opt, optim.MultiOptimizer):
            routes = opt.routes()
            assert routes[("c",)].options == (("layout", "in_out"),) and routes[("b",)].options == ()
