"""treeopt.checkpoint: the file format, loading on any backend from any backend, matching by
name (never by position), strict reports that change nothing, atomic and checksummed files,
MLX / torch interoperability, and the whole-model state of a MultiOptimizer."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import treeopt as optim
from treeopt import checkpoint, engine
from treeopt.backends import backend_of
from treeopt.tree import tree_flatten, tree_map

from arrays import BACKENDS, as_float64, available, backend_params, make

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.RoutingWarning")

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------ helpers
def model_values(seed=0):
    """The model's parameter values, as NumPy float32 (a nested tree with lists)."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "embed": {"weight": r(10, 8)},
        "layers": [{"attn": {"weight": r(8, 8), "bias": r(8)}, "mlp": {"weight": r(16, 8)}} for _ in range(2)],
        "norm": {"scale": r(8)},
        "head": {"weight": r(4, 8)},
    }


def on(tree, backend, dtype="float32"):
    """A NumPy tree as a fresh tree of ``backend`` arrays (new containers, new arrays)."""
    if isinstance(tree, dict):
        return {k: on(v, backend, dtype) for k, v in tree.items()}
    if isinstance(tree, list):
        return [on(v, backend, dtype) for v in tree]
    return make(tree, backend, dtype)


def grads_for(values, step, backend, nonfinite=False):
    """Deterministic gradients for step ``step`` (a NaN in one leaf with ``nonfinite``)."""
    rng = np.random.default_rng(1000 + step)
    out = tree_map(lambda v: (rng.standard_normal(v.shape) * 0.1).astype(np.float32), values)
    if nonfinite:
        out["norm"]["scale"][0] = np.nan
    return on(out, backend)


def is_layer_matrix(path, weight):
    return path.startswith("layers.") and len(weight.shape) == 2


def not_layer_matrix(path, weight):
    return not is_layer_matrix(path, weight)


def muon_adamw(**options):
    """Muon for the layers' matrices, AdamW (scheduled learning rate and weight decay) for the rest."""
    return optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(optim.cosine_decay(3e-3, 10), weight_decay=optim.linear_schedule(0.0, 0.1, 10))],
        [is_layer_matrix],
        **options,
    )


def train(opt, params, backend, steps, start=0, nonfinite_at=()):
    for step in range(start, start + steps):
        opt.update(params, grads_for(model_values(), step, backend, nonfinite=step in nonfinite_at))
    return params


def numpy_of(x):
    backend = backend_of(x)
    if backend.name == "python":
        return np.asarray(x)
    return np.array(backend.to_numpy(x), copy=True)


def flat(tree):
    """``{path: NumPy copy}`` of every array leaf of a tree (ints kept as they are)."""
    return {k: (v if isinstance(v, (int, float)) else numpy_of(v)) for k, v in tree_flatten(tree)}


def snapshot(opt):
    """A deep copy of the whole state: tree_flatten + NumPy copies, dtypes kept."""
    return flat(opt.state)


def assert_bit_identical(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape, (key, x.dtype, y.dtype, x.shape, y.shape)
            assert x.tobytes() == y.tobytes(), key
        else:
            assert x == y, key


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for key in a:
        np.testing.assert_allclose(
            np.asarray(a[key], np.float64), np.asarray(b[key], np.float64), rtol=rtol, atol=atol, err_msg=key
        )


def state_by_key(opt):
    """The state as the checkpoint sees it, ``{"path/slot" or "@name/scalar": NumPy copy}``."""
    tensors, _ = checkpoint.to_flat(opt)
    return {k: numpy_of(v) for k, v in tensors.items()}


def slots_by_path(opt):
    """Only the parameters' slots (``"path/slot"``), independent of optimizer names."""
    return {k: v for k, v in state_by_key(opt).items() if not k.startswith(("@", "#"))}


def child(opt, type_name):
    return next(o for o in opt.optimizers if type(o).__name__ == type_name)


# ------------------------------------------------------------------------------ 1. the format
def test_file_is_safetensors_with_keys_by_path_and_metadata(tmp_path):
    values = model_values()
    params = on(values, "numpy")
    opt = optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(3e-3, betas=(0.9, lambda step: 0.99))],
        [is_layer_matrix],
        names=["hidden", "rest"],
    )
    train(opt, params, "numpy", 3)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(opt, path)

    from safetensors import safe_open

    with safe_open(str(path), "numpy") as handle:
        keys = set(handle.keys())
        tensors = {k: handle.get_tensor(k) for k in keys}
        metadata = json.loads(handle.metadata()["treeopt"])
    expected = {"@hidden/step", "@hidden/learning_rate", "@rest/step", "@rest/learning_rate", "@rest/betas[1]"}
    for i in range(2):
        expected |= {
            f"layers.{i}.attn.weight/v",
            f"layers.{i}.mlp.weight/v",
            f"layers.{i}.attn.bias/m",
            f"layers.{i}.attn.bias/v",
        }
    for name in ("embed.weight", "norm.scale", "head.weight"):
        expected |= {f"{name}/m", f"{name}/v"}
    assert keys == expected
    np.testing.assert_array_equal(
        tensors["layers.0.attn.weight/v"], opt.optimizers[0].state["layers"][0]["attn"]["weight"]["v"]
    )
    np.testing.assert_array_equal(tensors["head.weight/m"], opt.optimizers[1].state["head"]["weight"]["m"])
    assert int(tensors["@hidden/step"]) == 3 and int(tensors["@rest/step"]) == 3
    assert tensors["@hidden/step"].shape == () and tensors["@rest/learning_rate"].shape == ()  # 0-d, as in the state
    assert tensors["@hidden/learning_rate"] == np.float32(0.02)
    assert tensors["@rest/betas[1]"] == np.float32(0.99)

    assert metadata["format"] == "treeopt-checkpoint"
    assert metadata["format_version"] == 1
    assert metadata["treeopt_version"] == optim.__version__
    assert metadata["step"] == 3
    hidden, rest = metadata["optimizers"]
    assert (hidden["name"], hidden["position"], hidden["type"]) == ("hidden", [0], "Muon")
    assert (rest["name"], rest["position"], rest["type"]) == ("rest", [1], "AdamW")
    assert hidden["hyperparameters"] == {
        "momentum": 0.95,
        "weight_decay": 0.01,
        "decoupled_weight_decay": False,
        "nesterov": True,
        "ns_steps": 5,
        "ns_dtype": None,
        "ns_eps": 1e-7,
        "adjust_lr": "original",
        "layout": None,
    }
    assert rest["hyperparameters"]["eps"] == 1e-8 and rest["hyperparameters"]["weight_decay"] == 0.01
    assert rest["scheduled"] == ["betas[1]"] and hidden["scheduled"] == []
    params_meta = metadata["parameters"]
    assert params_meta["layers.1.mlp.weight"] == {
        "owner": "hidden",
        "slots": {"v": {"shape": [16, 8], "dtype": "float32"}},
    }
    assert params_meta["norm.scale"]["owner"] == "rest"
    assert params_meta["norm.scale"]["slots"] == {
        "m": {"shape": [8], "dtype": "float32"},
        "v": {"shape": [8], "dtype": "float32"},
    }
    assert set(params_meta) == {k.rpartition("/")[0] for k in keys if not k.startswith("@")}
    assert metadata["checksum"]["algorithm"] == "crc32" and len(metadata["checksum"]["value"]) == 8
    # read() gives the same, checksum verified
    arrays, read_meta = checkpoint.read(path)
    assert read_meta == metadata and set(arrays) == keys


def test_loading_never_unpickles(tmp_path, monkeypatch):
    values = model_values()
    opt = muon_adamw()
    train(opt, on(values, "numpy"), "numpy", 2)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(opt, path)
    npz = tmp_path / "opt.npz"
    np.savez(npz, **{k: numpy_of(v) for k, v in tree_flatten(opt.state)})

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    for source in (path, npz):
        fresh = muon_adamw()
        assert checkpoint.load(fresh, source, params=on(values, "numpy")).ok
        assert_bit_identical(slots_by_path(fresh), slots_by_path(opt))
    # an .npz holding an object array is refused, not unpickled
    evil = tmp_path / "evil.npz"
    np.savez(evil, step=np.array(1, np.uint64), **{"w.m": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(ValueError):
        checkpoint.load(muon_adamw(), evil, params=on(values, "numpy"))


# ------------------------------------------------------------------------------ 2. any backend to any backend
PAIRS = [
    pytest.param(
        s,
        d,
        id=f"{s}-to-{d}",
        marks=pytest.mark.skipif(not (available(s) and available(d)), reason=f"{s} or {d} is not installed"),
    )
    for s in BACKENDS
    for d in BACKENDS
]


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


# ------------------------------------------------------------------------------ 5. atomic, checksummed files
def small_optimizer():
    return optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(optim.cosine_decay(1e-3, 10))], [lambda p, w: p == "w"])


def small_params():
    return {"w": np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4), "b": np.linspace(0, 1, 4, dtype=np.float32)}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A small checkpoint (so that every byte of it can be damaged) and the state it holds."""
    opt, params = small_optimizer(), small_params()
    for step in range(3):
        opt.update(params, tree_map(lambda p: np.full_like(p, 0.1 * (step + 1)), params))
    path = tmp_path_factory.mktemp("small") / "opt.safetensors"
    checkpoint.save(opt, path)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    return data, header_end, state_by_key(opt), checkpoint.read(path)[0]


def _region(position, header_end, data):
    if position < 8:
        return "length"
    if position >= header_end:
        return "data"
    metadata_start = data.index(b'"treeopt":"') + len(b'"treeopt":')
    text = json.loads(data[8:header_end])["__metadata__"]["treeopt"]
    metadata_end = metadata_start + len(json.dumps(text))  # the JSON string, quotes included
    assert data[metadata_start:metadata_end] == json.dumps(text).encode()
    return "metadata" if metadata_start <= position < metadata_end else "header"


def _attempt(tmp_path, damaged, expected_state, expected_arrays):
    """Load and read the damaged bytes: ``"error"``, or ``"same"`` when what came back is bit-identical to
    the undamaged checkpoint. A load of different values fails the test."""
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damaged)
    outcomes = []
    try:
        arrays, _ = checkpoint.read(path)
    except Exception as error:  # noqa: BLE001 - the type is checked below
        _check_error(error)
        outcomes.append("error")
    else:
        assert_bit_identical(arrays, expected_arrays)
        outcomes.append("same")
    opt = small_optimizer()
    try:
        checkpoint.load(opt, path, params=small_params())
    except Exception as error:  # noqa: BLE001
        _check_error(error)
        outcomes.append("error")
    else:
        assert_bit_identical(state_by_key(opt), expected_state)
        outcomes.append("same")
    return outcomes[1]


def _check_error(error):
    assert isinstance(error, checkpoint.CheckpointError) or any(
        word in str(error).lower() for word in ("corrupt", "truncat")
    ), f"unclear error {type(error).__name__}: {error}"


def test_a_truncated_file_is_an_error_at_every_offset(tmp_path, small_checkpoint):
    data, header_end, state, arrays = small_checkpoint
    offsets = list(range(len(data)))  # every offset: in the length, the header, the metadata and the data
    assert any(o < 8 for o in offsets) and any(8 <= o < header_end for o in offsets) and offsets[-1] > header_end
    for offset in offsets:
        assert _attempt(tmp_path, data[:offset], state, arrays) == "error", offset


def saved_larger_checkpoint(tmp_path):
    """A Muon + AdamW checkpoint after two steps: its values, optimizer, path, bytes and the
    end of its header."""
    values = model_values()
    opt = muon_adamw()
    train(opt, on(values, "numpy"), "numpy", 2)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(opt, path)
    data = path.read_bytes()
    return values, opt, path, data, 8 + int.from_bytes(data[:8], "little")


def test_random_truncations_of_a_larger_checkpoint(tmp_path):
    values, opt, path, data, header_end = saved_larger_checkpoint(tmp_path)
    rng = random.Random(1234)
    offsets = [rng.randrange(0, header_end) for _ in range(15)] + [
        rng.randrange(header_end, len(data)) for _ in range(15)
    ]
    for offset in offsets:
        path.write_bytes(data[:offset])
        with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupted"):
            checkpoint.load(muon_adamw(), path, params=on(values, "numpy"))
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.read(path)


def test_a_bit_flip_anywhere_is_an_error_never_wrong_values(tmp_path, small_checkpoint):
    data, header_end, state, arrays = small_checkpoint
    rng = random.Random(20240601)
    outcomes = {"length": [], "header": [], "metadata": [], "data": []}
    harmless = []
    for position in range(len(data)):  # every byte, one seeded random bit of it
        bit = rng.randrange(8)
        damaged = bytearray(data)
        damaged[position] ^= 1 << bit
        outcome = _attempt(tmp_path, bytes(damaged), state, arrays)
        outcomes[_region(position, header_end, data)].append(outcome)
        if outcome == "same":
            harmless.append(data[max(0, position - 12) : position + 1])
    assert all(len(v) > 0 for v in outcomes.values()), {k: len(v) for k, v in outcomes.items()}
    # the length, the tensor index and every byte of tensor data are always caught
    for region in ("length", "header", "data"):
        assert set(outcomes[region]) == {"error"}, region
    # in the metadata JSON only flips that change no value can go unnoticed (e.g. 1e-08 -> 1E-08, or the
    # unused name of the checksum algorithm); they loaded the very same state (checked in _attempt)
    assert outcomes["metadata"].count("same") <= 0.1 * len(outcomes["metadata"]), harmless


def test_bit_flips_in_a_larger_checkpoint(tmp_path):
    values, opt, path, data, header_end = saved_larger_checkpoint(tmp_path)
    rng = random.Random(99)
    positions = [rng.randrange(header_end, len(data)) for _ in range(30)] + [
        rng.randrange(8, header_end) for _ in range(30)
    ]
    expected = state_by_key(opt)
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        fresh = muon_adamw()
        try:
            checkpoint.load(fresh, path, params=on(values, "numpy"))
        except checkpoint.CheckpointError:
            continue
        assert position < header_end, position  # tensor data is always covered by the checksum
        assert_bit_identical(state_by_key(fresh), expected)


def test_a_checksum_mismatch_names_the_corruption(tmp_path, small_checkpoint):
    data = bytearray(small_checkpoint[0])
    data[-1] ^= 0x40  # the last byte of tensor data
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch, the file is corrupted"):
        checkpoint.read(path)
    with pytest.raises(FileNotFoundError):
        checkpoint.load(small_optimizer(), tmp_path / "nowhere.safetensors", params=small_params())


def test_a_damaged_npz_never_loads_wrong_values(tmp_path):
    values = model_values()
    opt = muon_adamw()
    train(opt, on(values, "numpy"), "numpy", 2)
    data_path = tmp_path / "opt.npz"
    np.savez(data_path, **{k: numpy_of(v) for k, v in tree_flatten(opt.state)})
    data = data_path.read_bytes()
    expected = state_by_key(opt)
    rng = random.Random(5)
    path = tmp_path / "damaged.npz"
    errors = 0
    for trial in range(60):
        damaged = bytearray(data)
        if trial % 2:
            damaged = damaged[: rng.randrange(len(data))]
        else:
            damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        fresh = muon_adamw()
        try:
            checkpoint.load(fresh, path, params=on(values, "numpy"))
        except checkpoint.CheckpointError:
            errors += 1
            continue
        assert trial % 2 == 0  # only a flip in the zip's own bookkeeping can leave the arrays intact
        assert_bit_identical(state_by_key(fresh), expected)
    assert errors >= 40


def test_a_damaged_npz_is_a_checkpoint_error(tmp_path):
    values = model_values()
    opt = muon_adamw()
    train(opt, on(values, "numpy"), "numpy", 1)
    path = tmp_path / "opt.npz"
    np.savez(path, **{k: numpy_of(v) for k, v in tree_flatten(opt.state)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.read(path)
    damaged = bytearray(data)
    damaged[len(data) // 3] ^= 0x10  # inside a stored array
    path.write_bytes(bytes(damaged))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(muon_adamw(), path, params=on(values, "numpy"))


def _writer(path, elements, start):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_checkpoint_writer.py"), str(path), str(elements), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )


def _uniform_value(path):
    """The one value every slot and the learning rate of a writer's checkpoint hold."""
    sys.path.insert(0, HERE)
    try:
        from _checkpoint_writer import state_for
    finally:
        sys.path.remove(HERE)
    opt = state_for(ELEMENTS)
    assert checkpoint.load(opt, path).ok
    values = {
        float(np.unique(a)[0]) for _, slots in engine.slot_items(opt) for a in slots.values() if np.unique(a).size == 1
    }
    assert len(values) == 1 and all(np.unique(a).size == 1 for _, s in engine.slot_items(opt) for a in s.values())
    value = values.pop()
    assert as_float64(opt.learning_rate) == value
    return int(value)


ELEMENTS = 1 << 20  # two slots of 4 MiB each


def test_a_save_killed_at_any_moment_leaves_the_last_good_checkpoint(tmp_path):
    sys.path.insert(0, HERE)
    try:
        from _checkpoint_writer import fill, state_for
    finally:
        sys.path.remove(HERE)
    path = tmp_path / "opt.safetensors"
    first = state_for(ELEMENTS)
    fill(first, 0)
    checkpoint.save(first, path)
    rng = random.Random(7)
    last = 0
    killed_mid_run = 0
    for iteration in range(15):
        start = (iteration + 1) * 1000
        writer = _writer(path, ELEMENTS, start)
        try:
            if iteration % 3:  # after its first save completed, at a random moment of the next ones
                line = writer.stdout.readline()
                assert line.strip() == str(start), line
                last = start
                killed_mid_run += 1
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            out, _ = writer.communicate()
        completed = [int(x) for x in out.split()]
        if completed:
            last = completed[-1]
        value = _uniform_value(path)  # loads, checksum verified: a whole checkpoint
        # the last completed save, or the one whose rename happened just before the kill
        assert value in (last, last + 1) or (value == start and last < start), (value, last)
        last = value
    leftovers = [name for name in os.listdir(tmp_path) if name != "opt.safetensors"]
    assert all(name.startswith(".") for name in leftovers), leftovers  # hidden temporary files only
    assert killed_mid_run >= 5


# ------------------------------------------------------------------------------ 6. MLX and torch interoperability
needs_mlx = pytest.mark.skipif(not available("mlx"), reason="mlx is not installed")
needs_torch = pytest.mark.skipif(not available("torch"), reason="torch is not installed")


def single_adamw():
    return optim.AdamW(optim.cosine_decay(3e-3, 10), weight_decay=0.05)


MLX_KINDS = {"single optimizer": single_adamw, "MultiOptimizer": muon_adamw}


@needs_mlx
@pytest.mark.parametrize("kind", list(MLX_KINDS))
@pytest.mark.parametrize("fmt", ["mx.save_safetensors", "np.savez"])
def test_a_state_saved_the_mlx_way_loads_and_resumes_identically(tmp_path, kind, fmt):
    import mlx.core as mx
    from mlx.utils import tree_flatten as mlx_tree_flatten

    make_opt = MLX_KINDS[kind]
    values = model_values()
    original_params = on(values, "mlx")
    original = make_opt()
    train(original, original_params, "mlx", 3)
    flat_state = dict(mlx_tree_flatten(original.state))
    if kind == "MultiOptimizer":
        assert "states.0.layers.0.attn.weight.v" in flat_state and "states.1.head.weight.m" in flat_state
    else:
        assert "step" in flat_state and "layers.0.attn.weight.m" in flat_state
    if fmt == "np.savez":
        path = tmp_path / "opt.npz"
        np.savez(path, **{k: np.array(v) for k, v in flat_state.items()})
    else:
        path = tmp_path / "opt.safetensors"
        mx.save_safetensors(str(path), flat_state)
    arrays, metadata = checkpoint.read(path)
    assert metadata is None and set(arrays) == set(flat_state)

    resumed_params = on(tree_map(numpy_of, original_params), "mlx")
    resumed = make_opt()
    report = checkpoint.load(resumed, path, params=resumed_params)
    assert report.ok, str(report)
    assert_bit_identical(flat(resumed.state), flat(original.state))
    assert all(backend_of(v).name == "mlx" for _, v in tree_flatten(resumed.state))
    train(original, original_params, "mlx", 3, start=3)
    train(resumed, resumed_params, "mlx", 3, start=3)
    assert_bit_identical(flat(original_params), flat(resumed_params))
    assert_bit_identical(flat(original.state), flat(resumed.state))


@needs_mlx
@pytest.mark.parametrize("dst", backend_params(["numpy", "torch", "jax"]))
def test_an_mlx_state_file_loads_on_other_backends(tmp_path, dst):
    import mlx.core as mx
    from mlx.utils import tree_flatten as mlx_tree_flatten

    values = model_values()
    original_params = on(values, "mlx")
    original = muon_adamw()
    train(original, original_params, "mlx", 3)
    path = tmp_path / "opt.safetensors"
    mx.save_safetensors(str(path), dict(mlx_tree_flatten(original.state)))
    resumed_params = on(tree_map(numpy_of, original_params), dst)
    resumed = muon_adamw()
    assert checkpoint.load(resumed, path, params=resumed_params).ok
    assert all(backend_of(v).name == dst for _, v in tree_flatten(resumed.state))
    assert_bit_identical(slots_by_path(resumed), slots_by_path(original))
    train(original, original_params, "mlx", 3, start=3)
    train(resumed, resumed_params, dst, 3, start=3)
    assert_close(flat(original_params), flat(resumed_params))


@pytest.mark.parametrize("backend", backend_params())
def test_mlx_layout_keys_are_tree_flatten_of_the_state(tmp_path, backend):
    values = model_values()
    opt = muon_adamw()
    train(opt, on(values, backend), backend, 2)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(opt, path, layout="mlx")
    expected = flat(opt.state)
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as handle:
        assert handle.metadata() in (None, {})  # no treeopt metadata in this layout
        stored = {k: handle.get_tensor(k) for k in handle.keys()}
    assert_bit_identical(stored, expected)
    assert [k for k, _ in tree_flatten(opt.state)] == list(expected)
    if available("mlx"):
        import mlx.core as mx

        loaded = mx.load(str(path))
        assert set(loaded) == set(expected)
        assert_bit_identical({k: np.array(v) for k, v in loaded.items()}, expected)
    # and it loads back into treeopt by the routing of the optimizer
    resumed = muon_adamw()
    assert checkpoint.load(resumed, path, params=on(values, backend)).ok
    assert_bit_identical(flat(resumed.state), expected)
    with pytest.raises(ValueError, match="layout"):
        checkpoint.save(opt, path, layout="pickle")


@needs_mlx
@pytest.mark.parametrize("kind", ["AdamW", "MultiOptimizer"])
def test_mlx_layout_file_drops_into_mlx_optimizers(tmp_path, kind):
    import mlx.core as mx
    import mlx.optimizers as mlx_optim
    from mlx.utils import tree_flatten as mlx_tree_flatten
    from mlx.utils import tree_unflatten as mlx_tree_unflatten

    def build(module):
        if kind == "AdamW":
            return module.AdamW(module.cosine_decay(3e-3, 10), weight_decay=0.05)
        return module.MultiOptimizer([module.Muon(0.02), module.AdamW(3e-3)], [is_layer_matrix])

    values = model_values()
    params = on(values, "mlx")
    opt = build(optim)
    train(opt, params, "mlx", 3)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(opt, path, layout="mlx")
    loaded = mx.load(str(path))
    assert set(loaded) == {k for k, _ in mlx_tree_flatten(opt.state)}

    theirs = build(mlx_optim)
    theirs.state = mlx_tree_unflatten(list(loaded.items()))
    assert set(k for k, _ in mlx_tree_flatten(theirs.state)) == set(loaded)
    their_params = on(tree_map(numpy_of, params), "mlx")
    for step in range(3, 6):
        grads = grads_for(values, step, "mlx")
        opt.update(params, grads)
        their_params = theirs.apply_gradients(grads, their_params)
        mx.eval(their_params, theirs.state)
    assert_close(flat(params), flat(their_params))
    step = theirs.state["step"] if kind == "AdamW" else theirs.state["states"][0]["step"]
    assert int(np.array(step)) == 6 == int(as_float64(opt.step))


def _torch_setup(seed=0):
    import torch

    import treeopt.torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )
    opt = treeopt.torch.Optimizer(
        model,
        optim.MultiOptimizer(
            [optim.Muon(0.02), optim.AdamW(optim.cosine_decay(3e-3, 10))],
            [lambda path, w: w.ndim == 2 and path in ("0.weight", "2.weight")],
            names=["hidden", "rest"],
        ),
    )
    return model, opt


def _torch_steps(model, opt, start, steps):
    import torch

    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _torch_resumed(model, load):
    """A fresh model with ``model``'s weights and a fresh optimizer, its state loaded by ``load``."""
    fresh_model, fresh_opt = _torch_setup(seed=1)
    fresh_model.load_state_dict(model.state_dict())
    load(fresh_opt)
    return fresh_model, fresh_opt


def _same_torch_training(model_a, opt_a, model_b, opt_b):
    _torch_steps(model_a, opt_a, 3, 3)
    _torch_steps(model_b, opt_b, 3, 3)
    assert_bit_identical(
        {k: v.numpy().copy() for k, v in model_a.state_dict().items()},
        {k: v.numpy().copy() for k, v in model_b.state_dict().items()},
    )
    assert_bit_identical(state_by_key(opt_a.optimizer), state_by_key(opt_b.optimizer))


@needs_torch
def test_torch_state_dict_is_the_checkpoint_content_and_torch_save_loads_it_weights_only(tmp_path):
    import torch

    model, opt = _torch_setup()
    _torch_steps(model, opt, 0, 3)
    state = opt.state_dict()
    tensors, metadata = checkpoint.to_flat(opt.optimizer)
    assert set(state) == {"tensors", "metadata", "state", "param_groups"}  # treeopt's content and torch's layout
    assert set(state["tensors"]) == set(tensors) and state["metadata"] == metadata
    assert {"0.weight/v", "2.weight/v", "4.weight/m", "0.bias/v", "@hidden/step", "@rest/learning_rate"} <= set(tensors)
    assert all(isinstance(v, torch.Tensor) for v in state["tensors"].values())
    path = tmp_path / "opt.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["metadata"] == metadata
    assert_bit_identical(
        {k: v.numpy() for k, v in loaded["tensors"].items()}, {k: numpy_of(v) for k, v in tensors.items()}
    )

    def load(fresh_opt):
        report = fresh_opt.load_state_dict(loaded)
        assert report.ok, str(report)

    model_b, opt_b = _torch_resumed(model, load)
    assert int(as_float64(opt_b.optimizer.step)) == 3
    _same_torch_training(model, opt, model_b, opt_b)


@needs_torch
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_torch_distributed_checkpoint_in_one_process(tmp_path):
    import torch.distributed.checkpoint as dcp

    model, opt = _torch_setup()
    _torch_steps(model, opt, 0, 3)
    folder = tmp_path / "dcp"
    dcp.save(opt.state_dict(), checkpoint_id=str(folder))  # no process group needed

    def load(fresh_opt):
        fresh_opt.init()
        template = fresh_opt.state_dict()
        assert template["metadata"]["step"] == 0
        dcp.load(template, checkpoint_id=str(folder))
        assert template["metadata"]["step"] == 3
        report = fresh_opt.load_state_dict(template)
        assert report.ok, str(report)

    model_b, opt_b = _torch_resumed(model, load)
    assert_bit_identical(state_by_key(opt_b.optimizer), state_by_key(opt.optimizer))
    _same_torch_training(model, opt, model_b, opt_b)


@needs_torch
def test_torch_load_state_dict_is_strict_and_by_name(tmp_path):
    import torch

    model, opt = _torch_setup()
    _torch_steps(model, opt, 0, 3)
    state = opt.state_dict()
    # another model: one more layer, so "4.weight" becomes a hidden matrix of other shape
    bigger = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    import treeopt.torch

    other = treeopt.torch.Optimizer(
        bigger,
        optim.MultiOptimizer(
            [optim.Muon(0.02), optim.AdamW(optim.cosine_decay(3e-3, 10))],
            [lambda path, w: w.ndim == 2 and path in ("0.weight", "2.weight")],
            names=["hidden", "rest"],
        ),
    )
    with pytest.raises(checkpoint.CheckpointError) as caught:
        other.load_state_dict(state)
    assert {(p.kind, p.path) for p in caught.value.report.problems} == {
        ("shape", "4.weight/m"),
        ("shape", "4.weight/v"),
        ("shape", "4.bias/m"),
        ("shape", "4.bias/v"),
    }
    report = other.load_state_dict(state, strict=False)
    assert sorted(report.loaded) == ["0.bias", "0.weight", "2.bias", "2.weight"]


@needs_torch
def test_torch_round_trip_with_a_parameter_that_had_no_gradient_yet():
    import torch

    import treeopt.torch

    def setup():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 2), "unused": torch.nn.Linear(4, 2)})
        return model, treeopt.torch.Optimizer(model, optim.AdamW(1e-3))

    model, opt = setup()
    model["used"](torch.randn(3, 4)).sum().backward()
    opt.step()
    state = opt.state_dict()
    _, fresh = setup()
    assert fresh.load_state_dict(state).ok


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
