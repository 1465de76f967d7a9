"""treeopt.checkpoint's save and load: the whole-model state of a MultiOptimizer survives them,
and resuming gives the parameters of never stopping."""

import pytest

from arrays import as_float64
from checkpoint_helpers import (
    PAIRS,
    assert_bit_identical,
    assert_close,
    flat,
    model_values,
    muon_adamw,
    numpy_of,
    on,
    slots_by_path,
    state_by_key,
    train,
)
from treeopt import checkpoint
from treeopt.backends import backend_of
from treeopt.tree import tree_map

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.RoutingWarning")


# ------------------------------------------------------------------------------ 7. whole-model state
WHOLE_MODEL = {
    "skip_nonfinite": dict(skip_nonfinite=True),
    "accumulate=2": dict(accumulate=2),
    "clip + skip + per-group accumulation": dict(max_grad_norm=0.5, skip_nonfinite=True, accumulate=[1, 3]),
}
WHOLE_MODEL_PAIRS = [
    ("numpy", "numpy"),
    ("torch", "torch"),
    ("jax", "jax"),
    ("mlx", "mlx"),
    ("numpy", "torch"),
    ("torch", "jax"),
    ("jax", "mlx"),
    ("mlx", "numpy"),
]


@pytest.mark.parametrize("options", list(WHOLE_MODEL))
@pytest.mark.parametrize("src,dst", [p for p in PAIRS if tuple(p.values) in WHOLE_MODEL_PAIRS])
def test_whole_model_state_survives_save_and_load(tmp_path, options, src, dst):
    kwargs = WHOLE_MODEL[options]
    values = model_values()
    nonfinite = (1, 6) if kwargs.get("skip_nonfinite") else ()
    original_params = on(values, src)
    original = muon_adamw(**kwargs)
    train(original, original_params, src, 5, nonfinite_at=nonfinite)  # stops mid-accumulation
    state = original.state
    if kwargs.get("skip_nonfinite"):
        assert state["skipped_steps"] == 1
    if kwargs.get("accumulate"):
        skipped = sum(1 for step in nonfinite if step < 5)  # a skipped call is no micro-step
        assert state["micro_step"] == 5 - skipped and state["accumulated"]  # buffers waiting for the next step
    path = tmp_path / "opt.safetensors"
    checkpoint.save(original, path)

    resumed_params = on(tree_map(numpy_of, original_params), dst)
    resumed = muon_adamw(**kwargs)
    assert checkpoint.load(resumed, path, params=resumed_params).ok
    for key in ("skipped_steps", "micro_step"):
        assert resumed.state.get(key) == original.state.get(key), key
    if "accumulated" in original.state:
        buffers = resumed.state["accumulated"]
        assert set(buffers) == set(original.state["accumulated"])
        assert all(backend_of(v).name == dst for v in buffers.values())
        assert_bit_identical(
            {k: numpy_of(v) for k, v in buffers.items()},
            {k: numpy_of(v) for k, v in original.state["accumulated"].items()},
        )
    if "grad_norm" in original.state:
        assert as_float64(resumed.state["grad_norm"]) == as_float64(original.state["grad_norm"])

    train(original, original_params, src, 4, start=5, nonfinite_at=nonfinite)
    train(resumed, resumed_params, dst, 4, start=5, nonfinite_at=nonfinite)
    for key in ("skipped_steps", "micro_step"):
        assert resumed.state.get(key) == original.state.get(key), key
    if kwargs.get("skip_nonfinite"):
        assert resumed.state["skipped_steps"] == 2
    assert int(as_float64(resumed.step)) == int(as_float64(original.step))
    if src == dst:
        assert_bit_identical(flat(original_params), flat(resumed_params))
        assert_bit_identical(state_by_key(original), state_by_key(resumed))
    else:
        assert_close(flat(original_params), flat(resumed_params))
        assert_close(state_by_key(original), state_by_key(resumed))


def test_resuming_gives_the_same_parameters_as_never_stopping(tmp_path):
    """Save mid-accumulation with a skipped step behind, reload into a fresh optimizer and fresh arrays, and
    finish: the parameters equal those of a run that never stopped."""
    kwargs = dict(skip_nonfinite=True, accumulate=2, max_grad_norm=1.0)
    values = model_values()
    straight_params = on(values, "numpy")
    straight = muon_adamw(**kwargs)
    train(straight, straight_params, "numpy", 8, nonfinite_at=(2,))

    params = on(values, "numpy")
    first = muon_adamw(**kwargs)
    train(first, params, "numpy", 5, nonfinite_at=(2,))
    path = tmp_path / "opt.safetensors"
    checkpoint.save(first, path)
    del first
    params = on(tree_map(numpy_of, params), "numpy")
    second = muon_adamw(**kwargs)
    checkpoint.load(second, path, params=params)
    train(second, params, "numpy", 3, start=5, nonfinite_at=(2,))
    assert_bit_identical(flat(straight_params), flat(params))
    assert second.state["skipped_steps"] == straight.state["skipped_steps"] == 1


@pytest.mark.parametrize(
    "case", ["accumulate=2, saved after the first micro-step", "skip_nonfinite, first step skipped"]
)
def test_resume_before_the_first_step_without_params(tmp_path, case):
    """Saved before any parameter has state: loading without ``params`` (lazy init) resumes exactly."""
    kwargs = dict(accumulate=2) if case.startswith("accumulate") else dict(skip_nonfinite=True)
    nonfinite = () if case.startswith("accumulate") else (0,)
    values = model_values()
    original_params = on(values, "numpy")
    original = muon_adamw(**kwargs)
    train(original, original_params, "numpy", 1, nonfinite_at=nonfinite)
    assert not slots_by_path(original)  # no parameter has state yet
    path = tmp_path / "opt.safetensors"
    checkpoint.save(original, path)
    resumed_params = on(tree_map(numpy_of, original_params), "numpy")
    resumed = muon_adamw(**kwargs)
    assert checkpoint.load(resumed, path).ok
    train(original, original_params, "numpy", 3, start=1)
    train(resumed, resumed_params, "numpy", 3, start=1)
    assert_bit_identical(flat(original_params), flat(resumed_params))
    assert_bit_identical(state_by_key(original), state_by_key(resumed))


@pytest.mark.parametrize(
    "case",
    [
        "accumulate=2, saved after the first micro-step",
        "skip_nonfinite, first step skipped",
        "per-group accumulate=[1, 3]",
    ],
)
def test_resume_with_params_before_a_group_took_its_first_step(tmp_path, case):
    if case.startswith("accumulate"):
        kwargs, nonfinite, calls = dict(accumulate=2), (), 1
    elif case.startswith("skip"):
        kwargs, nonfinite, calls = dict(skip_nonfinite=True), (0,), 1
    else:
        kwargs, nonfinite, calls = dict(accumulate=[1, 3]), (), 2  # AdamW's group has not stepped yet
    values = model_values()
    original_params = on(values, "numpy")
    original = muon_adamw(**kwargs)
    train(original, original_params, "numpy", calls, nonfinite_at=nonfinite)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(original, path)
    resumed_params = on(tree_map(numpy_of, original_params), "numpy")
    resumed = muon_adamw(**kwargs)
    report = checkpoint.load(resumed, path, params=resumed_params)  # strict
    assert report.ok
    train(original, original_params, "numpy", 3, start=calls)
    train(resumed, resumed_params, "numpy", 3, start=calls)
    assert_bit_identical(flat(original_params), flat(resumed_params))
