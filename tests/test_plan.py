"""treeopt.plan: what goes where, why, with what state and settings; exports, rich, diffs
(routing that users can see, issue 4)."""

import io
import json

import numpy as np
import pytest

import treeopt as optim
from arrays import as_float64, make
from routing_helpers import (
    BACKENDS,
    GPT2_PATHS,
    GPT2_ROUTES,
    gpt2,
    grads_for,
    params_at,
    slot_paths,
    small,
    three_groups,
)
from treeopt import filters as F
from treeopt.plan import Plan
from treeopt.tree import tree_flatten

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.multi.RoutingWarning")


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


def _paths_in(text):
    """The paths of the parameter table of a rendered plan, each put back together from the
    lines its cell was folded onto."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("path "))
    column = lines[header].index("optimizer")
    paths = []
    for line in lines[header + 1 :]:
        if not line.strip():
            break
        if line[column:].strip():  # a row starts: its other cells are on its first line
            paths.append("")
        paths[-1] += line[:column].strip()
    return paths


@pytest.mark.parametrize("width", [60, 80, 100, 200])
def test_the_printed_plan_fits_the_terminal_and_folds_names_without_cutting_them(width, monkeypatch, capsys):
    plan = three_groups().plan(gpt2("numpy"))
    text = plan.text(width)
    assert max(map(len, text.splitlines())) <= width
    assert _paths_in(text) == GPT2_PATHS
    hyper = " ".join(text.split())  # every hyper-parameter whole, on the group's lines or in its column
    assert "momentum=0.95" in hyper and "betas=[0.9, 0.999]" in hyper
    rich_console = pytest.importorskip("rich.console")
    console = rich_console.Console(file=io.StringIO(), width=width)
    console.print(plan)
    assert console.file.getvalue().rstrip("\n") == text  # the same lines, only styled
    monkeypatch.setenv("COLUMNS", str(width))
    plan.print()  # not a terminal: $COLUMNS
    assert capsys.readouterr().out.rstrip("\n") == text


def test_a_zero1_plan_shows_its_ranks_in_a_table_of_their_own():
    plan = three_groups().plan(gpt2("numpy"))
    plan.ranks = [
        {"rank": 0, "parameters": 3, "state_bytes": 2048, "ns_gflop": 0.5, "sent_bytes": 100},
        {"rank": 1, "parameters": 2, "state_bytes": 1024, "ns_gflop": 0.25, "sent_bytes": 200},
    ]
    blocks = plan.text().split("\n\n")
    groups, ranks = blocks[1].splitlines(), blocks[2].splitlines()
    assert groups[0].split()[:2] == ["group", "type"] and not any(line.startswith("rank") for line in groups)
    assert ranks[0].split() == ["rank", "parameters", "state", "Newton-Schulz", "sends", "per", "step"]
    assert ranks[1].split()[:4] == ["0", "3", "2.0", "KiB"] and len(ranks) == 3
    assert "| rank | parameters |" in plan.to_markdown()
