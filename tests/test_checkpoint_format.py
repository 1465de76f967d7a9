"""treeopt.checkpoint.format: loading on any backend from any backend, matching by name (never
by position), strict reports that change nothing."""

import numpy as np
import pytest

import treeopt as optim
from arrays import as_float64, backend_params, make
from checkpoint_helpers import (
    PAIRS,
    assert_bit_identical,
    assert_close,
    child,
    flat,
    is_layer_matrix,
    model_values,
    muon_adamw,
    not_layer_matrix,
    numpy_of,
    on,
    slots_by_path,
    snapshot,
    state_by_key,
    train,
)
from treeopt import checkpoint
from treeopt.backends import backend_of
from treeopt.tree import tree_map

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.RoutingWarning")


# ------------------------------------------------------------------------------ 2. any backend to any backend
@pytest.mark.parametrize("src,dst", PAIRS)
def test_resume_on_any_backend_from_any_backend(tmp_path, src, dst):
    values = model_values()
    original_params = on(values, src)
    original = muon_adamw()
    train(original, original_params, src, 3)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(original, path)

    # the same parameter values, on dst
    resumed_params = on(tree_map(numpy_of, original_params), dst)
    resumed = muon_adamw()
    report = checkpoint.load(resumed, path, params=resumed_params)
    assert report.ok and report.problems == []
    assert sorted(report.loaded) == sorted(k.rpartition("/")[0] for k in slots_by_path(original) if k.endswith("/v"))

    # loaded state: every array of dst's library and dtype, values equal bit for bit
    tensors, _ = checkpoint.to_flat(resumed)
    for key, value in tensors.items():
        assert backend_of(value).name == dst, (key, type(value))
        if not key.startswith("@"):
            assert backend_of(value).dtype_name(value) == "float32", key
    assert backend_of(resumed.optimizers[0].state["layers"][1]["mlp"]["weight"]["v"]).name == dst
    assert_bit_identical(slots_by_path(resumed), slots_by_path(original))
    # step and learning rate (and the scheduled weight decay) restored
    for a, b in zip(original.optimizers, resumed.optimizers):
        assert int(as_float64(b.step)) == int(as_float64(a.step)) == 3
        assert as_float64(b.learning_rate) == as_float64(a.learning_rate)
    assert as_float64(resumed.optimizers[1].state["weight_decay"]) == as_float64(
        original.optimizers[1].state["weight_decay"]
    )

    # continue both with the same gradients
    train(original, original_params, src, 3, start=3)
    train(resumed, resumed_params, dst, 3, start=3)
    a_params, b_params = flat(original_params), flat(resumed_params)
    a_state, b_state = state_by_key(original), state_by_key(resumed)
    if src == dst:
        assert_bit_identical(a_params, b_params)
        assert_bit_identical(a_state, b_state)
    else:
        assert_close(a_params, b_params)
        assert_close(a_state, b_state)
    assert int(as_float64(resumed.step)) == 6


@pytest.mark.parametrize("how", ["optimizer schedule", "MultiOptimizer lr_schedule"])
def test_resume_with_a_scheduled_learning_rate(tmp_path, how):
    def make_opt():
        if how == "optimizer schedule":
            return optim.MultiOptimizer(
                [optim.Muon(0.02), optim.AdamW(optim.cosine_decay(3e-3, 10))], [is_layer_matrix]
            )
        return optim.MultiOptimizer(
            [optim.Muon(0.02), optim.AdamW(3e-3)], [is_layer_matrix], lr_schedule=optim.linear_schedule(0.1, 1.0, 5)
        )

    values = model_values()
    original_params = on(values, "numpy")
    original = make_opt()
    train(original, original_params, "numpy", 3)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(original, path)
    resumed_params = on(tree_map(numpy_of, original_params), "numpy")
    resumed = make_opt()
    assert as_float64(resumed.optimizers[1].learning_rate) != as_float64(original.optimizers[1].learning_rate)
    assert checkpoint.load(resumed, path, params=resumed_params).ok
    for a, b in zip(original.optimizers, resumed.optimizers):
        assert as_float64(b.learning_rate) == as_float64(a.learning_rate)
    _, metadata = checkpoint.read(path)
    assert "learning_rate" in metadata["optimizers"][1]["scheduled"]
    train(original, original_params, "numpy", 3, start=3)
    train(resumed, resumed_params, "numpy", 3, start=3)
    assert_bit_identical(flat(original_params), flat(resumed_params))


def _half_precision_roundtrip(tmp_path, src, dst, dtype):
    values = {"w": np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8), "b": np.linspace(0, 1, 8, dtype=np.float32)}
    params = on(values, src, dtype)
    opt = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [lambda p, w: p == "w"])
    for step in range(2):
        opt.update(params, tree_map(lambda v: make(np.full(v.shape, 0.1 * (step + 1)), src, dtype), values))
    path = tmp_path / "opt.safetensors"
    checkpoint.save(opt, path)
    resumed = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [lambda p, w: p == "w"])
    assert checkpoint.load(resumed, path, params=on(tree_map(numpy_of, params), dst, dtype)).ok
    for key, value in checkpoint.to_flat(resumed)[0].items():
        assert backend_of(value).name == dst
        if not key.startswith("@"):
            assert backend_of(value).dtype_name(value) == dtype, key
    a, b = slots_by_path(opt), slots_by_path(resumed)
    assert a.keys() == b.keys()
    for key in a:  # the same values (NumPy's bfloat16 is ml_dtypes')
        np.testing.assert_array_equal(a[key].astype(np.float64), b[key].astype(np.float64), err_msg=key)


@pytest.mark.parametrize("src,dst", [p for p in PAIRS if p.values[0] == p.values[1] or p.values[0] == "numpy"])
def test_float16_state_round_trips(tmp_path, src, dst):
    _half_precision_roundtrip(tmp_path, src, dst, "float16")


@pytest.mark.parametrize("backend", backend_params())
def test_bfloat16_state_round_trips(tmp_path, backend):
    _half_precision_roundtrip(tmp_path, backend, backend, "bfloat16")


# ------------------------------------------------------------------------------ 3. by name, never by position
def reversed_dict(tree):
    """The same parameters, every dict's keys in reverse order (lists kept: their index is the name)."""
    if isinstance(tree, dict):
        return {k: reversed_dict(tree[k]) for k in reversed(list(tree))}
    if isinstance(tree, list):
        return [reversed_dict(v) for v in tree]
    return tree


VARIANTS = {
    # name: (optimizer that saves, optimizer that loads, reverse the parameter dicts at load)
    "children reordered": (
        lambda: optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [is_layer_matrix]),
        lambda: optim.MultiOptimizer([optim.AdamW(3e-3), optim.Muon(0.02)], [not_layer_matrix]),
        False,
    ),
    "parameter dict reordered": (
        lambda: optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [is_layer_matrix]),
        lambda: optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [is_layer_matrix]),
        True,
    ),
    "child renamed": (
        lambda: optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [is_layer_matrix]),
        lambda: optim.MultiOptimizer(
            [optim.Muon(0.02), optim.AdamW(3e-3)], [is_layer_matrix], names=["hidden", "rest"]
        ),
        False,
    ),
    "names swapped between children": (
        lambda: optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [is_layer_matrix], names=["a", "b"]),
        lambda: optim.MultiOptimizer([optim.AdamW(3e-3), optim.Muon(0.02)], [not_layer_matrix], names=["a", "b"]),
        False,
    ),
    "all at once, per-group steps": (
        lambda: optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [is_layer_matrix], accumulate=[1, 2]),
        lambda: optim.MultiOptimizer(
            [optim.AdamW(3e-3), optim.Muon(0.02)],
            [not_layer_matrix],
            names=["matrices_later", "first"],
            accumulate=[2, 1],
        ),
        True,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_is_matched_by_name_never_by_position(tmp_path, variant):
    make_saver, make_loader, reverse = VARIANTS[variant]
    values = model_values()
    original_params = on(values, "numpy")
    original = make_saver()
    train(original, original_params, "numpy", 5)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(original, path)

    resumed_params = on(tree_map(numpy_of, original_params), "numpy")
    if reverse:
        resumed_params = reversed_dict(resumed_params)
        assert list(resumed_params) != list(original_params)
    resumed = make_loader()
    report = checkpoint.load(resumed, path, params=resumed_params)
    assert report.ok, str(report)
    # every parameter has its own state, compared by path
    assert_bit_identical(slots_by_path(resumed), slots_by_path(original))
    assert resumed.route("layers.0.attn.weight") == [type(o).__name__ for o in resumed.optimizers].index("Muon")
    # each optimizer got its own step and learning rate (not its neighbour's)
    for kind in ("Muon", "AdamW"):
        a, b = child(original, kind), child(resumed, kind)
        assert int(as_float64(b.step)) == int(as_float64(a.step)), kind
        assert as_float64(b.learning_rate) == as_float64(a.learning_rate), kind
    if "per-group" in variant:
        assert int(as_float64(child(resumed, "Muon").step)) == 5 and int(as_float64(child(resumed, "AdamW").step)) == 2
    # and training goes on exactly as if it never stopped
    train(original, original_params, "numpy", 3, start=5)
    train(resumed, resumed_params, "numpy", 3, start=5)
    assert_bit_identical(flat(original_params), flat(resumed_params))
    assert_bit_identical(slots_by_path(resumed), slots_by_path(original))


# ------------------------------------------------------------------------------ 4. strict report, all or nothing
def _f(*shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(dtype)


def _ones_grads(params):
    return tree_map(lambda p: np.full_like(p, 0.5), params)


def strict_saver():
    return optim.MultiOptimizer(
        [optim.Adafactor(), optim.SGD(0.1, momentum=0.9), optim.AdamW(1e-2)],
        [lambda p, w: p.startswith("fac."), lambda p, w: p.startswith("sgd.")],
    )


def strict_loader():
    # eps changed; "owner.w" now goes to SGD (it was AdamW's)
    return optim.MultiOptimizer(
        [optim.Adafactor(), optim.SGD(0.1, momentum=0.9), optim.AdamW(1e-2, eps=1e-6)],
        [lambda p, w: p.startswith("fac."), lambda p, w: p.startswith("sgd.") or p == "owner.w"],
    )


def strict_saved_params():
    return {
        "keep": {"w": _f(4, 4)},
        "gone": {"w": _f(3)},
        "shape": {"w": _f(4, 4)},
        "dtype": {"w": _f(4)},
        "owner": {"w": _f(5)},
        "fac": {"w": _f(4, 8)},
        "sgd": {"a": _f(6), "b": _f(7)},
    }


def strict_new_params():
    return {
        "keep": {"w": _f(4, 4, seed=1)},
        "shape": {"w": _f(5, 4)},
        "dtype": {"w": _f(4).astype(np.float16)},
        "owner": {"w": _f(5)},
        "fac": {"w": _f(32)},
        "sgd": {"a": _f(6), "b": _f(7)},
        "new": {"w": _f(2)},
    }


EXPECTED_PROBLEMS = {
    ("missing", "new.w"),
    ("unexpected", "gone.w"),
    ("shape", "shape.w/m"),
    ("shape", "shape.w/v"),
    ("dtype", "dtype.w/m"),
    ("dtype", "dtype.w/v"),
    ("owner", "owner.w"),
    ("slots", "fac.w"),
    ("hyperparameter", "AdamW"),
}


def test_an_optimizer_that_does_not_know_its_parameters_reports_them_unexpected(tmp_path):
    values = model_values()
    opt = muon_adamw()
    train(opt, on(values, "numpy"), "numpy", 1)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(opt, path)
    fresh = muon_adamw()
    before = snapshot(fresh)
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.load(fresh, path)  # no params, never stepped: nothing to match the state with
    assert {p.kind for p in caught.value.report.problems} == {"unexpected"}
    assert {p.path for p in caught.value.report.problems} == {k.rpartition("/")[0] for k in slots_by_path(opt)}
    assert_bit_identical(snapshot(fresh), before)


def test_what_is_not_a_checkpoint_of_this_treeopt_is_refused(tmp_path):
    from safetensors.numpy import save_file

    values = model_values()
    opt = muon_adamw()
    train(opt, on(values, "numpy"), "numpy", 1)
    tensors, metadata = checkpoint.to_flat(opt)
    with pytest.raises(checkpoint.CheckpointError, match="newer than this treeopt reads"):
        checkpoint.from_flat(muon_adamw(), tensors, dict(metadata, format_version=99))
    with pytest.raises(checkpoint.CheckpointError, match="not a treeopt checkpoint"):
        checkpoint.from_flat(muon_adamw(), tensors, dict(metadata, format="something-else"))
    plain = tmp_path / "weights.safetensors"
    save_file({"layer.weight": np.ones((2, 2), np.float32)}, str(plain))
    with pytest.raises(checkpoint.CheckpointError, match="neither treeopt metadata nor MLX"):
        checkpoint.load(muon_adamw(), plain, params=on(values, "numpy"))
    # two parameters whose dotted paths collide cannot be told apart by name: refused at save
    clash = {"a.b": np.ones(2, np.float32), "a": {"b": np.ones(2, np.float32)}}
    colliding = optim.AdamW(1e-3)
    colliding.update(clash, tree_map(np.ones_like, clash))
    with pytest.raises(checkpoint.CheckpointError, match="a.b"):
        checkpoint.save(colliding, tmp_path / "clash.safetensors")
    assert not (tmp_path / "clash.safetensors").exists()


@pytest.fixture
def mismatched(tmp_path):
    saved_params = strict_saved_params()
    saver = strict_saver()
    for _ in range(3):
        saver.update(saved_params, _ones_grads(saved_params))
    path = tmp_path / "opt.safetensors"
    checkpoint.save(saver, path)
    return saver, path


def test_strict_load_reports_every_problem_at_once_and_changes_nothing(mismatched):
    saver, path = mismatched
    params = strict_new_params()
    loader = strict_loader()
    for _ in range(2):  # a state of its own, different from the checkpoint's
        loader.update(params, _ones_grads(params))
    before = snapshot(loader)
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.load(loader, path, params=params, strict=True)
    report = caught.value.report
    assert isinstance(report, checkpoint.LoadReport) and not report.ok
    assert all(isinstance(p, checkpoint.Problem) for p in report.problems)
    found = {(p.kind, p.path) for p in report.problems}
    assert found == EXPECTED_PROBLEMS, str(report)
    assert {p.kind for p in report.problems} == {
        "missing",
        "unexpected",
        "shape",
        "dtype",
        "owner",
        "slots",
        "hyperparameter",
    }
    hyper = next(p for p in report.problems if p.kind == "hyperparameter")
    assert "eps" in hyper.message and "1e-08" in hyper.message and "1e-06" in hyper.message
    for kind, where in EXPECTED_PROBLEMS:
        assert where in str(caught.value), (kind, where)  # the message lists every problem too
    # nothing changed, bit for bit, and training still works
    assert_bit_identical(snapshot(loader), before)
    loader.update(params, _ones_grads(params))
    assert int(as_float64(loader.step)) == 3


def test_strict_is_the_default(mismatched):
    _, path = mismatched
    loader = strict_loader()
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(loader, path, params=strict_new_params())


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "unexpected",
        "shape",
        "dtype",
        "owner-sgd",
        "owner-adam",
        "slots",
        "hyperparameter-eps",
        "hyperparameter-weight_decay",
    ],
)
def test_each_problem_alone_is_reported(tmp_path, kind):
    base = {"a": {"w": _f(4, 4)}, "b": _f(6), "fac": _f(4, 8)}
    saver = optim.MultiOptimizer([optim.Adafactor(), optim.AdamW(1e-2)], [lambda p, w: p.startswith("fac")])
    for _ in range(2):
        saver.update(base, _ones_grads(base))
    path = tmp_path / "opt.safetensors"
    checkpoint.save(saver, path)

    params = tree_map(np.copy, base)
    children = [optim.Adafactor(), optim.AdamW(1e-2)]
    filters = [lambda p, w: p.startswith("fac")]
    expected = None
    if kind == "missing":
        params["c"], expected = _f(3), ("missing", "c")
    elif kind == "unexpected":
        del params["b"]
        expected = ("unexpected", "b")
    elif kind == "shape":
        params["b"], expected = _f(7), ("shape", "b/m")
    elif kind == "dtype":
        params["b"], expected = params["b"].astype(np.float16), ("dtype", "b/m")
    elif kind.startswith("owner"):
        other = optim.SGD(0.1, momentum=0.9) if kind == "owner-sgd" else optim.Adam(1e-2)
        children = [optim.Adafactor(), other, optim.AdamW(1e-2)]
        filters = [lambda p, w: p.startswith("fac"), lambda p, w: p == "b"]
        expected = ("owner", "b")
    elif kind == "slots":
        params["fac"], expected = _f(32), ("slots", "fac")
    elif kind == "hyperparameter-eps":
        children[1], expected = optim.AdamW(1e-2, eps=1e-5), ("hyperparameter", "AdamW")
    elif kind == "hyperparameter-weight_decay":
        children[1], expected = optim.AdamW(1e-2, weight_decay=0.1), ("hyperparameter", "AdamW")
    loader = optim.MultiOptimizer(children, filters)
    loader.init(params)
    before = snapshot(loader)
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.load(loader, path, params=params)
    found = {(p.kind, p.path) for p in caught.value.report.problems}
    assert expected in found, str(caught.value.report)
    assert {p.kind for p in caught.value.report.problems} <= {expected[0], "hyperparameter", "optimizer"}
    assert_bit_identical(snapshot(loader), before)


def test_non_strict_load_loads_what_fits_and_reports_the_rest(mismatched):
    saver, path = mismatched
    params = strict_new_params()
    loader = strict_loader()
    for _ in range(2):
        loader.update(params, _ones_grads(params))
    before = snapshot(loader)
    report = checkpoint.load(loader, path, params=params, strict=False)
    assert isinstance(report, checkpoint.LoadReport)
    assert {(p.kind, p.path) for p in report.problems} == EXPECTED_PROBLEMS
    assert sorted(report.loaded) == ["keep.w", "sgd.a", "sgd.b"]
    saved, now = slots_by_path(saver), slots_by_path(loader)
    for key in ("keep.w/m", "keep.w/v", "sgd.a/v", "sgd.b/v"):  # loaded
        assert_bit_identical({key: now[key]}, {key: saved[key]})
    for key in ("shape.w/m", "dtype.w/v", "owner.w/v", "fac.w/exp_avg_sq", "new.w/m"):  # kept as they were
        assert_bit_identical({key: now[key]}, {key: before["states." + _state_key(loader, key)]})
    assert int(as_float64(loader.step)) == 3  # the checkpoint's step


def _state_key(opt, key):
    path, _, slot = key.rpartition("/")
    index = opt.route(path)
    return f"{index}.{path}.{slot}"


def test_a_new_group_of_another_type_is_not_given_another_optimizers_scalars(tmp_path):
    params = {"w": _f(4, 4), "b": _f(4), "c": _f(3)}
    saver = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [lambda p, w: p == "w"])
    for _ in range(3):
        saver.update(params, _ones_grads(params))
    path = tmp_path / "opt.safetensors"
    checkpoint.save(saver, path)
    # a new SGD group takes "c", which AdamW owned
    loader = optim.MultiOptimizer(
        [optim.Muon(0.02), optim.SGD(0.5), optim.AdamW(1e-3)], [lambda p, w: p == "w", lambda p, w: p == "c"]
    )
    report = checkpoint.load(loader, path, params=params, strict=False)
    assert ("owner", "c") in {(p.kind, p.path) for p in report.problems}
    assert not [p for p in report.problems if p.kind == "hyperparameter"], str(report)
    assert as_float64(loader.optimizers[1].learning_rate) == np.float32(0.5)  # SGD keeps its own learning rate


def test_failed_strict_load_leaves_a_fresh_optimizer_unchanged(mismatched):
    _, path = mismatched
    loader = strict_loader()
    before = snapshot(loader)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(loader, path, params=strict_new_params())
    assert_bit_identical(snapshot(loader), before)
