"""Numbers = MLX: every optimizer and setting of the registry, every schedule and
clip_grad_norm, on every backend and dtype, against mlx.optimizers 0.32.4 itself."""

import zlib

import numpy as np
import pytest

import treeopt as optim
from arrays import DTYPES, TOLERANCE, as_float64, backend_params, make
from registry import SCHEDULES, SETTINGS
from treeopt.ops import dtype_name
from treeopt.tree import tree_flatten

mx = pytest.importorskip("mlx.core", reason="MLX is the numerical reference")
import mlx.optimizers as mlx_optim  # noqa: E402

SHAPES = {"tall": (5, 3), "wide": (3, 5), "vector": (4,), "cube": (2, 3, 4), "conv": (4, 2, 2, 2), "scalar": ()}
STEPS = 6


def tree_of(arrays):
    """A nested tree (dict, list, digit-free keys) around the named arrays."""
    return {
        "layers": [{"weight": arrays["tall"], "bias": arrays["vector"]}, {"weight": arrays["wide"]}],
        "cube": arrays["cube"],
        "conv": arrays["conv"],
        "scalar": arrays["scalar"],
    }


def random_problem(seed):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def convert(arrays, backend, dtype):
    return tree_of({k: make(v, backend, dtype) for k, v in arrays.items()})


def tolerance(backend, dtype, reference):
    rtol, atol = TOLERANCE[dtype]
    if backend == "jax" and dtype == "float16":
        # XLA rounds float16 division through a reciprocal: an ulp per division, which the
        # Newton-Schulz iterations amplify (measured up to ~3e-2 relative after 6 steps)
        rtol, atol = 5e-2, 1e-2
    finite = np.abs(reference[np.isfinite(reference)])
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    return rtol, atol * scale


def assert_close(actual, expected, backend, dtype, what):
    actual, expected = as_float64(actual), as_float64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    rtol, atol = tolerance(backend, dtype, np.asarray(expected))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def run_both(make_reference, make_treeopt, backend, dtype, seed):
    params, grads = random_problem(seed)
    reference, ours = make_reference(), make_treeopt()
    mlx_params, our_params = convert(params, "mlx", dtype), convert(params, backend, dtype)
    for step_grads in grads:
        mlx_params = reference.apply_gradients(convert(step_grads, "mlx", dtype), mlx_params)
        ours.update(our_params, convert(step_grads, backend, dtype))
    mx.eval(mlx_params, reference.state)
    return reference, ours, mlx_params, our_params


def compare_state(reference_state, our_state, backend, dtype):
    expected = dict(tree_flatten(reference_state))
    actual = dict(tree_flatten(our_state))
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        if key.endswith("step"):
            assert int(as_float64(actual[key])) == int(np.array(value)), key
        else:
            assert_close(actual[key], value, backend, dtype, f"state {key}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", backend_params())
# optimizers MLX lacks are checked against their own references in test_references.py
@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.capabilities.mlx_reference], ids=lambda s: s.id)
def test_optimizer_matches_mlx(setting, backend, dtype):
    seed = zlib.crc32(setting.id.encode())
    reference, ours, mlx_params, our_params = run_both(
        lambda: setting.make(mlx_optim), lambda: setting.make(optim), backend, dtype, seed
    )
    for (path, expected), (_, actual) in zip(tree_flatten(mlx_params), tree_flatten(our_params)):
        assert as_float64(actual).dtype == np.float64
        assert_close(actual, expected, backend, dtype, f"parameter {path}")
    compare_state(reference.state, ours.state, backend, dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "Muon", "Adafactor"])
def test_scheduled_learning_rate_matches_mlx(optimizer, schedule, backend):
    extra = {"relative_step": False} if optimizer == "Adafactor" else {}
    reference, ours, mlx_params, our_params = run_both(
        lambda: getattr(mlx_optim, optimizer)(learning_rate=SCHEDULES[schedule](mlx_optim), **extra),
        lambda: getattr(optim, optimizer)(learning_rate=SCHEDULES[schedule](optim), **extra),
        backend,
        "float32",
        seed=7,
    )
    assert_close(ours.learning_rate, reference.learning_rate, backend, "float32", "learning_rate")
    for (path, expected), (_, actual) in zip(tree_flatten(mlx_params), tree_flatten(our_params)):
        assert_close(actual, expected, backend, "float32", f"parameter {path}")


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_schedule_values_match_mlx(schedule):
    ours, reference = SCHEDULES[schedule](optim), SCHEDULES[schedule](mlx_optim)
    for step in range(12):
        expected = float(np.array(reference(mx.array(step, mx.uint64))))
        assert float(ours(step)) == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert float(as_float64(ours(np.uint64(step)))) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def clip_inputs(lib, dtype):
    rng = np.random.default_rng(3)
    if dtype == "int32":  # integer gradients come back as float32
        a, b = np.arange(12).reshape(4, 3) - 6, np.arange(5)
        if lib == "mlx":
            return {"a": mx.array(a.astype(np.int32)), "b": (mx.array(b.astype(np.int32)),)}
        return {"a": a.astype(np.int32), "b": (b.astype(np.int32),)}
    return {
        "a": make(rng.standard_normal((4, 3)) * 3, lib, dtype),
        "b": (make(rng.standard_normal(5) * 2, lib, dtype),),
    }


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 100.0])
@pytest.mark.parametrize(
    "backend, dtype",
    [pytest.param(b.values[0], d, marks=b.marks, id=f"{b.values[0]}-{d}") for b in backend_params() for d in DTYPES]
    + [("numpy", "int32")],
)
def test_clip_grad_norm_matches_mlx(backend, dtype, max_norm):
    expected, expected_norm = mlx_optim.clip_grad_norm(clip_inputs("mlx", dtype), max_norm)
    actual, norm = optim.clip_grad_norm(clip_inputs(backend, dtype), max_norm)
    assert isinstance(actual["b"], tuple)
    tol_dtype = "float32" if dtype == "int32" else dtype
    assert_close(norm, expected_norm, backend, tol_dtype, "norm")
    for name, ours, theirs in (("a", actual["a"], expected["a"]), ("b", actual["b"][0], expected["b"][0])):
        assert_close(ours, theirs, backend, tol_dtype, name)
        assert str(theirs.dtype).endswith(dtype_name(ours))


def test_clip_grad_norm_float16_is_summed_in_float32():
    grads = {"g": np.array([300.0, 400.0], np.float16)}  # squares overflow float16
    clipped, norm = optim.clip_grad_norm(grads, 1.0)
    assert float(norm) == 500.0 and norm.dtype == np.float32
    assert clipped["g"].dtype == np.float16
    np.testing.assert_allclose(clipped["g"].astype(np.float32), [0.6, 0.8], rtol=1e-3)
