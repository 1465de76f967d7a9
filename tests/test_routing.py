"""Routing that users can see (issue 4), on NumPy and torch tensors.

1. plans: what goes where, why, with what state and settings; exports, rich, diffs
2. checks: unmatched parameters, filters that match nothing, overlaps, Muon's guards
3. the filter library on realistic parameter names, and ``frozen=``
4. the ``muon_adamw`` preset
5. schedules across groups (``lr_schedule``) and scheduled hyper-parameters of one group
6. whole-model operations: global clipping, skipping non-finite steps, accumulation
7. changes during training: freeze, unfreeze, new parameters, reroute

"""

import io
import json
import re
import warnings

import numpy as np
import pytest

import treeopt
import treeopt as optim
from treeopt import checkpoint
from treeopt import filters as F
from treeopt.multi import RoutingError, RoutingWarning
from treeopt.plan import Plan
from treeopt.tree import tree_flatten, tree_map

from arrays import as_float64, backend_params, make

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.multi.RoutingWarning")

BACKENDS = backend_params(["numpy", "torch"])
SCALARS = ("step", "learning_rate")


# ---------------------------------------------------------------------------------- helpers
def gpt2(backend, seed=0):
    """A tiny GPT-2 with PyTorch's parameter names."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return make(0.5 * rng.standard_normal(shape), backend)

    return {
        "transformer": {
            "wte": {"weight": r(16, 8)},
            "h": [
                {
                    "ln_1": {"weight": r(8), "bias": r(8)},
                    "attn": {"c_attn": {"weight": r(8, 24), "bias": r(24)}},
                    "mlp": {"c_fc": {"weight": r(8, 16)}},
                }
            ],
            "ln_f": {"weight": r(8)},
        },
        "lm_head": {"weight": r(16, 8)},
    }


GPT2_PATHS = [
    "transformer.wte.weight",
    "transformer.h.0.ln_1.weight",
    "transformer.h.0.ln_1.bias",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.attn.c_attn.bias",
    "transformer.h.0.mlp.c_fc.weight",
    "transformer.ln_f.weight",
    "lm_head.weight",
]


def small(backend, seed=0):
    """A small nested model: one hidden matrix, a bias, a norm weight."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return make(0.5 * rng.standard_normal(shape), backend)

    return {"layers": [{"attn": {"weight": r(4, 4), "bias": r(4)}, "norm": {"weight": r(4)}}]}


def params_at(params, path):
    """The array at a dotted path."""
    node = params
    for key in path.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def grads_for(params, backend, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return tree_map(lambda p: make(scale * rng.standard_normal(tuple(p.shape)), backend), params)


def copy_tree(tree, backend):
    return tree_map(lambda p: make(as_float64(p), backend), tree)


def flat(tree):
    """``{path: float64 copy}`` of every array in ``tree``, for bit-identical comparisons."""
    return {k: as_float64(v).copy() for k, v in tree_flatten(tree) if v is not None}


def assert_identical(a, b):
    assert list(a) == list(b)
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), key


def slot_paths(state):
    """The parameter paths that have slots in one optimizer's state."""
    return sorted({k.rsplit(".", 1)[0] for k, _ in tree_flatten(state) if k not in SCALARS and "." in k})


def messages(record, category=RoutingWarning):
    return [str(w.message) for w in record if issubclass(w.category, category)]


def three_groups(**options):
    return optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(3e-4, weight_decay=0.1), optim.SGD(0.1, momentum=0.9)],
        [F.is_hidden_matrix, F.is_bias | F.is_norm],
        names=["muon", "adamw", "sgd"],
        **options,
    )


#: where three_groups() sends each GPT-2 parameter
GPT2_ROUTES = {
    "transformer.wte.weight": (2, "sgd", "fallback"),
    "transformer.h.0.ln_1.weight": (1, "adamw", "filters[1] (is_bias | is_norm)"),
    "transformer.h.0.ln_1.bias": (1, "adamw", "filters[1] (is_bias | is_norm)"),
    "transformer.h.0.attn.c_attn.weight": (0, "muon", "filters[0] (is_hidden_matrix)"),
    "transformer.h.0.attn.c_attn.bias": (1, "adamw", "filters[1] (is_bias | is_norm)"),
    "transformer.h.0.mlp.c_fc.weight": (0, "muon", "filters[0] (is_hidden_matrix)"),
    "transformer.ln_f.weight": (1, "adamw", "filters[1] (is_bias | is_norm)"),
    "lm_head.weight": (2, "sgd", "fallback"),
}


# ================================================================================ 1. plans
@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_rows_say_where_each_parameter_goes_and_why(backend):
    params = gpt2(backend)
    multi = three_groups()
    plan = multi.plan(params)
    assert isinstance(plan, Plan) and plan.step == 0
    assert [r.path for r in plan.rows] == GPT2_PATHS  # tree order
    sizes = {k: int(np.prod(v.shape)) for k, v in tree_flatten(params)}
    slots_per_element = {"muon": 1, "adamw": 2, "sgd": 1}  # Muon v; AdamW m, v; SGD momentum v
    for row in plan.rows:
        group, name, rule = GPT2_ROUTES[row.path]
        assert (row.group, row.optimizer, row.reason) == (group, name, rule), row.path
        assert row.shape == tuple(params_at(params, row.path).shape)
        assert (row.dtype, row.size) == ("float32", sizes[row.path])
        assert row.state_bytes == slots_per_element[name] * 4 * row.size, row.path
        assert row.learning_rate == pytest.approx({"muon": 0.02, "adamw": 3e-4, "sgd": 0.1}[name], rel=1e-6)
        assert row.weight_decay == pytest.approx({"muon": 0.01, "adamw": 0.1, "sgd": 0.0}[name])
        assert row.also_matched == () and row.notes == ()
        assert multi.route(row.path) == group
    assert [(g.index, g.name, g.type) for g in plan.groups] == [
        (0, "muon", "Muon"),
        (1, "adamw", "AdamW"),
        (2, "sgd", "SGD"),
    ]
    for g in plan.groups:
        mine = [r for r in plan.rows if r.group == g.index]
        assert (g.parameters, g.size, g.state_bytes) == (
            len(mine),
            sum(r.size for r in mine),
            sum(r.state_bytes for r in mine),
        )
    assert plan.groups[0].hyperparameters["momentum"] == pytest.approx(0.95)
    assert plan.groups[1].hyperparameters["betas"] == pytest.approx((0.9, 0.999))
    assert plan.changes == [] and plan.warnings == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_bytes_follow_the_parameter_dtype(backend):
    params = {
        "a": {"weight": make(np.ones((4, 8)), backend, "float16")},
        "b": {"weight": make(np.ones((4, 8)), backend, "float32")},
    }
    plan = optim.MultiOptimizer([optim.AdamW(1e-3), optim.SGD(0.1, momentum=0.9)], [F.glob("a.*")]).plan(params)
    assert [(r.path, r.dtype, r.state_bytes) for r in plan.rows] == [
        ("a.weight", "float16", 2 * 2 * 32),
        ("b.weight", "float32", 1 * 4 * 32),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_lr_in_the_plan_is_the_one_of_the_next_step(backend):
    params = small(backend)
    multi = optim.MultiOptimizer([optim.SGD(optim.linear_schedule(0.1, 0.2, 4)), optim.Adam(1e-3)], [F.ndim(2)])
    for k in range(3):
        plan = multi.plan(params)
        assert plan.step == k
        assert [r.learning_rate for r in plan.rows] == pytest.approx([0.1 + 0.025 * k, 1e-3, 1e-3], rel=1e-6)
        multi.update(params, grads_for(params, backend, k))
        assert float(as_float64(multi.learning_rate[0])) == pytest.approx(0.1 + 0.025 * k, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_exports_text_dict_json_markdown_and_rich(backend):
    multi = three_groups()
    plan = multi.plan(gpt2(backend))
    text = str(plan)
    assert text.splitlines()[0] == "Routing plan at step 0"
    assert all(path in text for path in GPT2_PATHS)
    assert Plan.from_dict(plan.to_dict()) == plan
    data = json.loads(plan.to_json())
    assert [p["path"] for p in data["parameters"]] == GPT2_PATHS
    assert data["parameters"][3]["shape"] == [8, 24] and [g["name"] for g in data["groups"]] == ["muon", "adamw", "sgd"]
    assert Plan.from_dict(data).rows == plan.rows
    markdown = plan.to_markdown().splitlines()
    assert markdown[0] == "**Routing plan at step 0**"
    assert markdown[2] == "| path | optimizer | reason | shape | dtype | size | state | lr | wd |"  # no notes column
    assert markdown[3] == "|---|---|---|---|---|---|---|---|---|"
    assert (
        "| transformer.h.0.ln_1.bias | adamw | filters[1] (is_bias \\| is_norm) | 8 | float32 | 8 | 64 B | 0.0003 "
        "| 0.1 |"
    ) in markdown  # a | inside a cell is escaped
    rich_console = pytest.importorskip("rich.console")
    console = rich_console.Console(file=io.StringIO(), width=200)
    console.print(plan)
    rendered = console.file.getvalue()
    assert "Routing plan at step 0" in rendered and all(path in rendered for path in GPT2_PATHS)
    assert "0: muon" in rendered and "2: sgd" in rendered


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plan_read_back_from_json_equals_the_plan(backend):
    plan = three_groups().plan(gpt2(backend))
    assert Plan.from_dict(json.loads(plan.to_json())) == plan


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_plan_printed_is_the_plan_used(backend):
    calls = []

    def hidden(path, weight):
        calls.append(path)
        return F.is_hidden_matrix(path, weight)

    params = gpt2(backend)
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [hidden], names=["muon", "adamw"])
    plan = multi.plan(params)
    assert calls == GPT2_PATHS  # each parameter routed once, in tree order
    planned = {r.path: r.group for r in plan.rows}
    multi.update(params, grads_for(params, backend, 1))
    assert calls == GPT2_PATHS  # the step reused the plan's routes: no filter was called again
    assert {path: multi.route(path) for path in GPT2_PATHS} == planned
    for i, state in enumerate(multi.state["states"]):
        assert slot_paths(state) == sorted(p for p, g in planned.items() if g == i)
        assert int(as_float64(state["step"])) == 1
    after = multi.plan()
    assert not plan.diff(after) and str(plan.diff(after)) == "no change"
    assert [r.state_bytes for r in after.rows] == [r.state_bytes for r in plan.rows]


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_diff_reports_added_removed_moved_and_changed(backend):
    params = gpt2(backend)
    multi = three_groups()
    before = multi.plan(params)
    params["transformer"]["h"][0]["attn"]["lora_a"] = make(np.zeros((2, 8)), backend)
    params["transformer"]["h"][0]["attn"]["lora_b"] = make(np.zeros((24, 2)), backend)
    multi.update(params, grads_for(params, backend, 1))
    multi.reroute("transformer.ln_f.weight", to="sgd")
    after = multi.plan(params)
    diff = before.diff(after)
    assert diff.added == ["transformer.h.0.attn.lora_a", "transformer.h.0.attn.lora_b"]
    assert diff.removed == [] and diff.changed == []
    assert diff.moved == [("transformer.ln_f.weight", "adamw", "sgd")]

    other = gpt2(backend)  # a changed model: one parameter gone, one resized
    del other["transformer"]["h"][0]["mlp"]
    other["lm_head"]["weight"] = make(np.zeros((20, 8)), backend)
    diff = before.diff(three_groups().plan(other))
    assert (diff.added, diff.moved) == ([], [])
    assert diff.removed == ["transformer.h.0.mlp.c_fc.weight"]
    assert diff.changed == [("lm_head.weight", "float32[16, 8]", "float32[20, 8]")]
    assert str(diff) == "- transformer.h.0.mlp.c_fc.weight\n~ lm_head.weight: float32[16, 8] -> float32[20, 8]"
    assert diff.to_dict()["removed"] == ["transformer.h.0.mlp.c_fc.weight"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_single_optimizer_has_a_plan_with_one_group(backend):
    params = gpt2(backend)
    plan = optim.AdamW(1e-3, weight_decay=0.05).plan(params)
    assert [r.path for r in plan.rows] == GPT2_PATHS
    assert {(r.group, r.optimizer, r.reason) for r in plan.rows} == {(0, "AdamW", "all parameters")}
    assert all(r.state_bytes == 2 * 4 * r.size for r in plan.rows)
    assert all(r.weight_decay == pytest.approx(0.05) for r in plan.rows)
    (group,) = plan.groups
    assert (group.index, group.name, group.type, group.parameters) == (0, "AdamW", "AdamW", len(GPT2_PATHS))
    assert group.size == sum(r.size for r in plan.rows) and plan.warnings == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_level_parameters_are_in_the_plan(backend):
    params = {
        "embed": make(np.ones((6, 4)), backend),
        "w": make(np.ones((4, 4)), backend),
        "layers": [{"weight": make(np.ones((4, 4)), backend)}],
    }
    plan = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [F.is_hidden_matrix]).plan(params)
    assert [r.path for r in plan.rows] == ["embed", "w", "layers.0.weight"]


@pytest.mark.parametrize("case", ["reroute", "accumulating"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_routed_parameters_without_state_yet_are_in_the_plan(backend, case):
    params = small(backend)
    multi = optim.MultiOptimizer(
        [optim.AdamW(1e-3), optim.SGD(0.1, momentum=0.9)],
        [F.ndim(2)],
        names=["adamw", "sgd"],
        accumulate=2 if case == "accumulating" else 1,
    )
    multi.update(params, grads_for(params, backend, 0))
    if case == "reroute":
        multi.reroute("layers.0.attn.bias", to="adamw")
    rows = {r.path: r for r in multi.plan().rows}
    assert sorted(rows) == ["layers.0.attn.bias", "layers.0.attn.weight", "layers.0.norm.weight"]
    assert rows["layers.0.attn.bias"].optimizer == ("adamw" if case == "reroute" else "sgd")
    assert rows["layers.0.attn.bias"].state_bytes == (2 if case == "reroute" else 1) * 4 * 4


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


# ================================================================================ 3. filters
class Shaped:
    """A weight stand-in for tests of names only."""

    def __init__(self, *shape):
        self.shape, self.ndim = shape, len(shape)


def test_filter_names_compose_readably():
    assert str(F.is_bias | F.is_norm) == "is_bias | is_norm"
    assert str(~(F.is_bias | F.is_norm)) == "~(is_bias | is_norm)"
    assert str(~F.is_bias) == "~is_bias"
    assert str(F.ndim(min=2) & F.is_embedding & F.is_head) == "ndim(min=2) & is_embedding & is_head"
    assert str((F.ndim(2) & F.is_bias) | F.is_norm) == "(ndim(2) & is_bias) | is_norm"
    assert str(F.is_norm & (F.is_bias | F.ndim(1))) == "is_norm & (is_bias | ndim(1))"
    assert str(F.ndim(max=1)) == "ndim(max=1)" and str(F.ndim(min=1, max=2)) == "ndim(min=1, max=2)"
    assert str(F.shape(None, 4)) == "shape(None, 4)"
    assert str(F.glob("blocks.*.weight", "head.*")) == "glob('blocks.*.weight', 'head.*')"
    assert str(F.regex(r"^layers\.\d+")) == r"regex('^layers\\.\\d+')"

    def by_name(path, weight):
        return path == "x"

    assert str(F.is_bias | by_name) == "is_bias | by_name" and str(by_name | F.is_bias) == "by_name | is_bias"
    assert str(F.as_filter(lambda p, w: True)) == "<lambda>" and F.as_filter(F.is_bias) is F.is_bias
    with pytest.raises(TypeError, match="a filter must be callable, got str"):
        F.as_filter("is_bias")
    combined = ~(F.is_bias | F.is_norm) & F.ndim(min=2)
    assert combined("layers.0.weight", Shaped(3, 3)) is True
    assert combined("layers.0.bias", Shaped(3, 3)) is False and combined("layers.0.weight", Shaped(3)) is False
    assert (by_name | F.is_bias)("x", Shaped(2)) and not (by_name & F.is_bias)("x", Shaped(2))


def test_negations_need_no_parentheses_in_names():
    assert str(F.ndim(min=2) & ~F.is_embedding & ~F.is_head) == "ndim(min=2) & ~is_embedding & ~is_head"
    assert str(~F.is_bias | F.is_norm) == "~is_bias | is_norm"


@pytest.mark.parametrize("backend", BACKENDS)
def test_structural_filters(backend):
    def w(*shape):
        return make(np.zeros(shape), backend)

    assert F.glob("transformer.h.*.attn.*")("transformer.h.11.attn.c_attn.weight", w(2, 2))  # * crosses dots
    assert not F.glob("transformer.h.*.attn.*")("transformer.h.0.mlp.c_fc.weight", w(2, 2))
    assert F.glob("a.*", "*.bias")("x.bias", w(2)) and not F.glob("a.*")("ba.c", w(2))
    assert F.regex(r"self_attn\.[qk]_proj")("model.layers.3.self_attn.q_proj.weight", w(2, 2))
    assert not F.regex(r"^self_attn")("model.layers.3.self_attn.q_proj.weight", w(2, 2))
    assert [F.ndim(1)("p", w(*s)) for s in [(), (3,), (3, 3)]] == [False, True, False]
    assert [F.ndim(min=2)("p", w(*s)) for s in [(3,), (3, 3), (2, 3, 3)]] == [False, True, True]
    assert [F.ndim(max=1)("p", w(*s)) for s in [(), (3,), (3, 3)]] == [True, True, False]
    assert [F.ndim(min=1, max=2)("p", w(*s)) for s in [(), (3,), (3, 3), (1, 1, 1)]] == [False, True, True, False]
    assert [F.shape(None, 4)("p", w(*s)) for s in [(3, 4), (7, 4), (4, 3), (4,), (2, 3, 4)]] == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert F.shape(2, 3)("p", w(2, 3)) and not F.shape(2, 3)("p", w(2, 4))
    assert F.everything("anything", w()) and F.everything("", w(5, 5))


#: realistic names (PyTorch GPT-2, Llama, flax linen, MLX) and the name filters that accept them
NAMES = {
    # PyTorch GPT-2
    "transformer.wte.weight": ((50, 8), {"is_embedding"}),
    "transformer.wpe.weight": ((16, 8), {"is_embedding"}),
    "transformer.h.0.ln_1.weight": ((8,), {"is_norm"}),
    "transformer.h.0.ln_1.bias": ((8,), {"is_bias", "is_norm"}),
    "transformer.h.0.attn.c_attn.weight": ((8, 24), {"is_hidden_matrix"}),
    "transformer.h.0.attn.c_attn.bias": ((24,), {"is_bias"}),
    "transformer.h.0.mlp.c_proj.weight": ((32, 8), {"is_hidden_matrix"}),
    "transformer.ln_f.weight": ((8,), {"is_norm"}),
    "lm_head.weight": ((50, 8), {"is_head"}),
    # Llama (Hugging Face and Meta's original)
    "model.embed_tokens.weight": ((50, 8), {"is_embedding"}),
    "model.layers.0.input_layernorm.weight": ((8,), {"is_norm"}),
    "model.layers.0.post_attention_layernorm.weight": ((8,), {"is_norm"}),
    "model.layers.0.self_attn.q_proj.weight": ((8, 8), {"is_hidden_matrix"}),
    "model.layers.0.mlp.gate_proj.weight": ((16, 8), {"is_hidden_matrix"}),
    "model.norm.weight": ((8,), {"is_norm"}),
    "tok_embeddings.weight": ((50, 8), {"is_embedding"}),
    "layers.0.attention_norm.weight": ((8,), {"is_norm"}),
    "layers.0.attention.wq.weight": ((8, 8), {"is_hidden_matrix"}),
    "output.weight": ((50, 8), {"is_head"}),
    # flax linen
    "params.Embed_0.embedding": ((50, 8), {"is_embedding"}),
    "params.LayerNorm_0.scale": ((8,), {"is_norm"}),
    "params.LayerNorm_0.bias": ((8,), {"is_bias", "is_norm"}),
    "params.Dense_0.kernel": ((8, 8), {"is_hidden_matrix"}),
    "params.Dense_0.bias": ((8,), {"is_bias"}),
    # MLX
    "embed.weight": ((50, 8), {"is_embedding"}),
    "layers.0.norm.weight": ((8,), {"is_norm"}),
    "layers.0.attention.query_proj.weight": ((8, 8), {"is_hidden_matrix"}),
    "layers.0.attention.query_proj.bias": ((8,), {"is_bias"}),
    "norm.weight": ((8,), {"is_norm"}),
    # others
    "classifier.weight": ((3, 8), {"is_head"}),
    "bn1.weight": ((8,), {"is_norm"}),
    "conv1.weight": ((8, 3, 3, 3), {"is_hidden_matrix"}),
    "b": ((8,), {"is_bias"}),
    "mlp.b": ((8, 8), {"is_hidden_matrix"}),  # "b" is a bias only as a vector
    "layers.0.w": ((8,), set()),
}
NAME_FILTERS = [F.is_bias, F.is_norm, F.is_embedding, F.is_head, F.is_hidden_matrix]


@pytest.mark.parametrize("backend", BACKENDS)
def test_name_filters_on_realistic_names(backend):
    for path, (shape, expected) in NAMES.items():
        weight = make(np.zeros(shape), backend)
        accepted = {f.name for f in NAME_FILTERS if f(path, weight)}
        assert accepted == expected, path


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_level_arrays_are_named_by_their_own_name(backend):
    head, vector = make(np.ones((10, 8)), backend), make(np.ones(8), backend)
    assert F.is_head("head", head) and F.is_head("lm_head", head) and F.is_head("output", head)
    assert F.is_embedding("embed", head) and F.is_embedding("wte", head)
    assert F.is_norm("ln_f", vector) and F.is_norm("norm", vector) and F.is_bias("bias", vector)
    assert not F.is_hidden_matrix("head", head) and F.is_hidden_matrix("w", head)
    params = {
        "embed": {"weight": make(np.ones((10, 8)), backend)},
        "layers": [{"w": make(np.ones((8, 8)), backend)}],
        "head": make(np.ones((10, 8)), backend),
    }  # the README's naming
    assert treeopt.muon_adamw(params).route("head") == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameters_get_no_state_and_never_change(backend):
    params = gpt2(backend)
    before = flat(params)
    frozen = ["transformer.wte.weight", "lm_head.weight"]
    multi = three_groups(frozen=F.is_embedding | F.glob("lm_head.*"))
    for k in range(3):
        multi.update(params, grads_for(params, backend, k))
    after = flat(params)
    for path in GPT2_PATHS:
        assert np.array_equal(after[path], before[path]) == (path in frozen), path
    for state in multi.state["states"]:
        assert not set(slot_paths(state)) & set(frozen)
    assert [multi.route(p) for p in frozen] == [None, None]
    plan = multi.plan()
    assert [r.path for r in plan.rows] == GPT2_PATHS
    rows = {r.path: r for r in plan.rows}
    assert (
        rows["transformer.wte.weight"].group,
        rows["transformer.wte.weight"].optimizer,
        rows["transformer.wte.weight"].reason,
    ) == (-1, "frozen", "frozen")
    assert [(rows[p].shape, rows[p].dtype, rows[p].size, rows[p].state_bytes) for p in frozen] == [
        ((16, 8), "float32", 128, 0),
        ((16, 8), "float32", 128, 0),
    ]
    assert plan.groups[2].parameters == 0  # sgd (the fallback) took only what is not frozen: nothing


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


# ================================================================================ 5. schedules
WARMUP_COSINE = optim.join_schedules([optim.linear_schedule(0.1, 1.0, 3), optim.cosine_decay(1.0, 5, 0.05)], [3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_lr_schedule_keeps_the_groups_ratio(backend):
    params = small(backend)
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [F.ndim(2)], lr_schedule=WARMUP_COSINE)
    twin = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [F.ndim(2)])  # constant lrs, set by hand
    twin_params = copy_tree(params, backend)
    for k in range(9):
        m = WARMUP_COSINE(k)
        assert multi.lr_multiplier == pytest.approx(m)
        plan = multi.plan(params)
        planned = [g.hyperparameters["learning_rate"] for g in plan.groups]
        assert planned == pytest.approx([0.02 * m, 3e-4 * m], rel=1e-6)  # the next step's, before it runs
        grads = grads_for(params, backend, k)
        multi.update(params, grads)
        used = [float(as_float64(lr)) for lr in multi.learning_rate]
        assert used == pytest.approx([0.02 * m, 3e-4 * m], rel=1e-6)
        assert used[0] / used[1] == pytest.approx(0.02 / 3e-4, rel=1e-6)
        twin.learning_rate = multi.learning_rate  # the stored values are the ones the step used
        twin.update(twin_params, grads)
        assert_identical(flat(params), flat(twin_params))
    assert multi.lr_multiplier == pytest.approx(0.05)
    assert optim.MultiOptimizer([optim.SGD(0.1)]).lr_multiplier is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_schedule_multiplies_a_groups_own_schedule(backend):
    params = small(backend)
    multi = optim.MultiOptimizer(
        [optim.SGD(optim.exponential_decay(0.1, 0.5)), optim.Adam(1e-3)],
        [F.ndim(2)],
        lr_schedule=optim.linear_schedule(0.5, 1.0, 2),
    )
    for k in range(4):
        multi.update(params, grads_for(params, backend, k))
        m = min(k, 2) * 0.25 + 0.5
        assert [float(as_float64(lr)) for lr in multi.learning_rate] == pytest.approx(
            [0.1 * 0.5**k * m, 1e-3 * m], rel=1e-6
        )


def scheduled_children():
    return [
        optim.Muon(0.02, momentum=optim.linear_schedule(0.85, 0.95, 10)),
        optim.AdamW(
            3e-4, weight_decay=optim.linear_schedule(0.0, 0.1, 10), betas=(0.9, optim.linear_schedule(0.9, 0.999, 10))
        ),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduled_hyperparameters_live_in_the_childs_state_and_are_used(backend):
    params = small(backend)
    multi = optim.MultiOptimizer(scheduled_children(), [F.ndim(2)])
    muon, adamw = optim.Muon(0.02, momentum=0.5), optim.AdamW(3e-4, weight_decay=0.5)  # constants, set each step
    twin = optim.MultiOptimizer([muon, adamw], [F.ndim(2)])
    twin_params = copy_tree(params, backend)
    for k in range(4):
        hyper = multi.plan(params).groups
        assert hyper[0].hyperparameters["momentum"] == pytest.approx(0.85 + 0.01 * k, rel=1e-6)  # the next step's
        assert hyper[1].hyperparameters["weight_decay"] == pytest.approx(0.01 * k, abs=1e-7)
        assert hyper[1].hyperparameters["betas"] == pytest.approx((0.9, 0.9 + 0.0099 * k), rel=1e-6)
        grads = grads_for(params, backend, k)
        multi.update(params, grads)
        muon_state, adamw_state = multi.state["states"]
        momentum, decay, beta2 = (
            float(as_float64(s[n]))
            for s, n in ((muon_state, "momentum"), (adamw_state, "weight_decay"), (adamw_state, "betas[1]"))
        )
        assert momentum == pytest.approx(0.85 + 0.01 * k, rel=1e-6)
        assert decay == pytest.approx(0.01 * k, abs=1e-7) and beta2 == pytest.approx(0.9 + 0.0099 * k, rel=1e-6)
        muon.momentum, adamw.weight_decay, adamw.betas = momentum, decay, (0.9, beta2)
        twin.update(twin_params, grads)
        assert_identical(flat(params), flat(twin_params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduled_hyperparameters_survive_a_checkpoint(backend, tmp_path):
    params = small(backend)
    multi = optim.MultiOptimizer(scheduled_children(), [F.ndim(2)], lr_schedule=WARMUP_COSINE)
    for k in range(3):
        multi.update(params, grads_for(params, backend, k))
    checkpoint.save(multi, tmp_path / "opt.safetensors")
    restored = optim.MultiOptimizer(scheduled_children(), [F.ndim(2)], lr_schedule=WARMUP_COSINE)
    restored_params = copy_tree(params, backend)
    report = checkpoint.load(restored, tmp_path / "opt.safetensors", params=restored_params)
    assert report.ok
    for i, names in enumerate(
        [("step", "learning_rate", "momentum"), ("step", "learning_rate", "weight_decay", "betas[1]")]
    ):
        for name in names:
            saved, loaded = multi.state["states"][i][name], restored.state["states"][i][name]
            assert np.array_equal(as_float64(saved), as_float64(loaded)), (i, name)
    assert_identical(flat(multi.state["states"]), flat(restored.state["states"]))
    grads = grads_for(params, backend, 9)
    multi.update(params, grads)
    restored.update(restored_params, grads)
    assert_identical(flat(params), flat(restored_params))
    assert_identical(flat(multi.state["states"]), flat(restored.state["states"]))


# ================================================================================ 6. whole model
@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_clips_all_groups_together(backend):
    params = gpt2(backend)
    twin_params = copy_tree(params, backend)
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-2)], [F.is_hidden_matrix], max_grad_norm=0.5)
    twin = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-2)], [F.is_hidden_matrix])
    for k, scale in enumerate([3.0, 0.01, 1.0]):  # one step under the limit
        grads = grads_for(params, backend, k, scale)
        clipped, norm = optim.clip_grad_norm(grads_for(params, backend, k, scale), 0.5)
        multi.update(params, grads)
        twin_params = twin.apply_gradients(clipped, twin_params)
        assert_identical(flat(params), flat(twin_params))
        assert np.array_equal(as_float64(multi.state["grad_norm"]), as_float64(norm))
        expected = np.sqrt(sum(np.sum(as_float64(g) ** 2) for _, g in tree_flatten(grads)))
        assert float(as_float64(multi.state["grad_norm"])) == pytest.approx(expected, rel=1e-5)
    assert_identical(flat(multi.state["states"]), flat(twin.state["states"]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nonfinite_gradient_skips_the_step_for_every_group(backend, bad):
    params = gpt2(backend)
    multi = three_groups(skip_nonfinite=True)

    def poisoned(k):
        grads = grads_for(params, backend, k)
        bias = grads["transformer"]["h"][0]["ln_1"]["bias"]  # one element of one AdamW gradient
        grads["transformer"]["h"][0]["ln_1"]["bias"] = make(np.where(np.arange(8) == 3, bad, as_float64(bias)), backend)
        return grads

    multi.update(params, poisoned(0))  # even the first step: nothing is created
    assert multi.state["skipped_steps"] == 1
    assert all(sorted(s) == ["learning_rate", "step"] for s in multi.state["states"])
    for k in range(1, 3):
        multi.update(params, grads_for(params, backend, k))
    params_before, state_before = flat(params), flat(multi.state["states"])
    for skipped in (2, 3):
        multi.update(params, poisoned(skipped + 5))
        assert multi.state["skipped_steps"] == skipped
        assert_identical(flat(params), params_before)
        assert_identical(flat(multi.state["states"]), state_before)  # slots, steps, learning rates
        assert [int(as_float64(s["step"])) for s in multi.state["states"]] == [2, 2, 2]
        assert not np.isfinite(float(as_float64(multi.state["grad_norm"])))
    multi.update(params, grads_for(params, backend, 20))
    assert [int(as_float64(s["step"])) for s in multi.state["states"]] == [3, 3, 3]
    assert multi.state["skipped_steps"] == 3


def average(a, b):
    return tree_map(lambda x, y: (x + y) / 2, a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_averages_gradients_over_calls(backend):
    params = gpt2(backend)
    twin_params = copy_tree(params, backend)
    multi = three_groups(accumulate=2)
    twin = three_groups()
    for k in range(0, 6, 2):
        g1, g2 = grads_for(params, backend, k), grads_for(params, backend, k + 1)
        before = flat(params)
        multi.update(params, g1)
        assert_identical(flat(params), before)  # the first call of a pair only accumulates
        multi.update(params, g2)
        twin_params = twin.apply_gradients(average(g1, g2), twin_params)
        assert_identical(flat(params), flat(twin_params))
        assert int(as_float64(multi.step)) == k // 2 + 1
    assert_identical(flat(multi.state["states"]), flat(twin.state["states"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_per_group(backend):
    params = {"dense": {"weight": make(np.full((3, 3), 0.5), backend)}, "dense2": {"bias": make(np.ones(3), backend)}}
    multi = optim.MultiOptimizer(
        [optim.SGD(0.1, momentum=0.9), optim.AdamW(1e-2, bias_correction=True)], [F.ndim(2)], accumulate=[1, 2]
    )
    sgd, adamw = optim.SGD(0.1, momentum=0.9), optim.AdamW(1e-2, bias_correction=True)
    alone = {"dense": copy_tree(params["dense"], backend), "dense2": copy_tree(params["dense2"], backend)}
    grads = [grads_for(params, backend, k) for k in range(4)]
    for k, g in enumerate(grads):
        multi.update(params, g)
        alone["dense"] = sgd.apply_gradients(g["dense"], alone["dense"])  # group 0: every call
        if k % 2 == 1:  # group 1: every second call, with the average of the two
            alone["dense2"] = adamw.apply_gradients(average(grads[k - 1]["dense2"], g["dense2"]), alone["dense2"])
        assert_identical(flat(params), flat(alone))
        assert [int(as_float64(s["step"])) for s in multi.state["states"]] == [k + 1, (k + 1) // 2]


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
