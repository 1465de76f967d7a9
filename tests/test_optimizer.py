"""The Optimizer base contract: init, lazy init, apply_gradients, update, state, step,
learning rate and schedules, the fixes of MLX's weaknesses W7/W8, and bad input."""

import copy
from collections import OrderedDict, namedtuple

import numpy as np
import pytest

import treeopt as optim
from treeopt.ops import dtype_name
from treeopt.tree import tree_flatten, tree_map, tree_unflatten

from arrays import as_float64, backend_params, make
from registry import SETTINGS

Pair = namedtuple("Pair", "first second")


def f32(*values):
    return np.array(values, dtype=np.float32)


def snapshot(state):
    """A deep copy of a state, for "nothing changed" checks."""
    return [(k, np.array(v, copy=True)) for k, v in tree_flatten(state)]


def assert_same_state(before, state):
    after = snapshot(state)
    assert [k for k, _ in after] == [k for k, _ in before]
    for (key, a), (_, b) in zip(before, after):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), key


# ---------------------------------------------------------------------------- init
def test_init_mirrors_parameters_with_mlx_layout():
    opt = optim.SGD(0.1, momentum=0.9)
    params = {"weight": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32), "dropout": {}}
    opt.init(params)
    assert list(opt.state) == ["step", "learning_rate", "weight", "bias", "dropout"]
    assert opt.state["dropout"] == {}
    assert opt.state["weight"]["v"].shape == (2, 3) and opt.state["weight"]["v"].dtype == np.float32
    assert not opt.state["bias"]["v"].any()
    assert opt.state["step"].dtype == np.uint64 and int(opt.state["step"]) == 0
    assert opt.state["learning_rate"].dtype == np.float32


def test_init_is_additive_and_idempotent():
    opt = optim.Adam(0.1)
    params = {"a": np.ones(3, np.float32)}
    opt.init(params)
    m = opt.state["a"]["m"]
    opt.update(params, {"a": f32(1, 1, 1)})
    opt.init(params)
    assert opt.state["a"]["m"] is m and m.any()  # kept, not reset
    params["b"] = np.ones(2, np.float32)
    opt.init(params)
    assert set(opt.state) == {"step", "learning_rate", "a", "b"} and opt.state["a"]["m"] is m


def test_lazy_init_on_first_step_and_step_counter():
    opt = optim.Adam(0.1)
    params = {"w": np.ones(2, np.float32)}
    opt.apply_gradients({"w": f32(1, 2)}, params)
    opt.apply_gradients({"w": f32(1, 2)}, params)
    assert int(opt.step) == 2 and opt.step.dtype == np.uint64
    np.testing.assert_allclose(opt.state["w"]["m"], 0.19 * f32(1, 2), rtol=1e-6)


def test_apply_gradients_returns_the_gradients_structure_and_leaves_inputs_alone():
    opt = optim.SGD(0.5)
    params = {"a": f32(1, 2), "extra": f32(5)}
    grads = {"a": f32(2, 2)}
    new = opt.apply_gradients(grads, params)
    assert list(new) == ["a"]
    np.testing.assert_array_equal(new["a"], f32(0, 1))
    np.testing.assert_array_equal(params["a"], f32(1, 2))
    np.testing.assert_array_equal(grads["a"], f32(2, 2))


def test_apply_gradients_on_an_empty_tree_counts_the_step():
    opt = optim.SGD(0.1)
    assert opt.apply_gradients({}, {}) == {}
    assert int(opt.step) == 1


def test_update_writes_numpy_arrays_in_place_deeply():
    opt = optim.SGD(1.0)
    x, y, z = f32(1), f32(2), f32(3)
    model = {"a": {"x": x, "y": y}, "t": (z,)}
    opt.update(model, {"a": {"x": f32(1)}, "t": (f32(1),)})
    assert model["a"]["y"] is y and model["a"]["x"] is x and model["t"][0] is z  # nothing dropped or replaced
    assert x[0] == 0 and y[0] == 2 and z[0] == 2


def test_update_replaces_python_numbers_and_read_only_arrays():
    opt = optim.SGD(1.0)
    frozen = f32(4)
    frozen.flags.writeable = False
    model = {"s": 3.0, "r": frozen}
    opt.update(model, {"s": 1.0, "r": f32(1)})
    assert float(model["s"]) == 2.0 and model["s"].dtype == np.float32
    assert model["r"] is not frozen and float(model["r"][0]) == 3.0


def test_update_on_immutable_arrays_rebinds_them():
    mx = pytest.importorskip("mlx.core")
    opt = optim.SGD(1.0)
    model = {"a": [mx.array([1.0])], "b": (mx.array([2.0]),)}
    opt.update(model, {"a": [mx.array([1.0])], "b": (mx.array([1.0]),)})
    assert model["a"][0].item() == 0.0 and model["b"][0].item() == 1.0


# ---------------------------------------------------------------------------- learning rate and schedules
def test_learning_rate_getter_setter_and_integer_learning_rate():
    opt = optim.SGD(1)  # before a step, scalars are NumPy's, or MLX's once MLX is loaded
    assert dtype_name(opt.learning_rate) == "float32"  # MLX would store int32
    opt.learning_rate = 2
    assert dtype_name(opt.learning_rate) == "float32" and float(opt.learning_rate) == 2.0
    params = {"w": f32(1)}
    opt.update(params, {"w": f32(1)})
    assert params["w"][0] == -1.0


def test_adafactor_without_learning_rate_has_none():
    with pytest.raises(AttributeError, match="Adafactor has no learning_rate"):
        optim.Adafactor().learning_rate


def test_schedule_may_return_a_python_float():
    opt = optim.SGD(lambda step: 0.5)
    params = {"w": f32(1)}
    opt.update(params, {"w": f32(1)})
    assert params["w"][0] == 0.5 and opt.learning_rate.dtype == np.float32


def test_scheduled_learning_rate_uses_the_step_before_the_update():
    opt = optim.SGD(optim.step_decay(0.1, 0.9, 1))
    params = {"w": f32(0)}
    for it in range(4):
        opt.update(params, {"w": f32(0)})
        assert float(opt.learning_rate) == pytest.approx(0.1 * 0.9**it)


def test_setting_a_scheduled_learning_rate_is_overridden_by_the_schedule():
    opt = optim.SGD(optim.exponential_decay(0.1, 0.5))
    opt.learning_rate = 5.0
    params = {"w": f32(1)}
    opt.update(params, {"w": f32(1)})
    assert params["w"][0] == pytest.approx(0.9)


def test_any_hyperparameter_can_follow_a_schedule():
    momentum = optim.linear_schedule(0.0, 0.9, 3)
    opt = optim.SGD(1.0, momentum=momentum)
    assert float(opt.state["momentum"]) == 0.0
    params = {"w": f32(0)}
    velocity = 0.0
    for step in range(5):
        mu = min(step, 3) * 0.3
        velocity = mu * velocity + 1.0
        opt.update(params, {"w": f32(1)})
        assert float(opt.state["momentum"]) == pytest.approx(mu)
        assert float(opt.state["w"]["v"][0]) == pytest.approx(velocity, rel=1e-6)


def test_join_schedules_never_feeds_a_wrapped_step_to_later_schedules():
    seen = []

    def later(step):
        seen.append(int(step))
        return 1.0

    schedule = optim.join_schedules([lambda s: 0.0, later], [5])
    for step in range(8):
        schedule(np.uint64(step))
    assert seen == [0, 0, 0, 0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="boundaries must not decrease"):
        optim.join_schedules([lambda s: 0, lambda s: 1, lambda s: 2], [5, 3])


# ---------------------------------------------------------------------------- W7: trees that change
def test_new_parameters_after_the_first_step_are_initialised():
    opt = optim.Adam(0.1)
    params = {"a": f32(1)}
    opt.update(params, {"a": f32(1)})
    params["lora"] = {"A": f32(0, 0)}
    opt.update(params, {"a": f32(1), "lora": {"A": f32(1, 1)}})
    assert int(opt.step) == 2
    np.testing.assert_allclose(opt.state["lora"]["A"]["m"], f32(0.1, 0.1), rtol=1e-6)


def test_none_gradient_skips_the_parameter_and_keeps_its_state():
    opt = optim.Adam(0.1)
    params = {"a": f32(1), "b": f32(2)}
    opt.update(params, {"a": f32(1), "b": f32(1)})
    b_state = snapshot(opt.state["b"])
    b_value = params["b"].copy()
    new = opt.apply_gradients({"a": f32(1), "b": None}, params)
    assert new["b"] is params["b"]
    np.testing.assert_array_equal(params["b"], b_value)
    assert_same_state(b_state, opt.state["b"])
    assert int(opt.step) == 2


def test_top_level_lists_and_tuples_of_parameters():
    for container in (list, tuple):
        opt = optim.Adam(0.1)
        params = container([f32(1, 2), f32(3)])
        new = opt.apply_gradients(container([f32(1, 1), f32(1)]), params)
        assert type(new) is container and len(new) == 2
        assert opt.state[0]["m"].shape == (2,) and opt.state[1]["v"].shape == (1,)


def test_parameter_names_that_are_reserved_state_keys():
    params = {"step": f32(1), "learning_rate": f32(2), "w": f32(3)}
    grads = {"step": f32(1), "learning_rate": f32(1), "w": f32(1)}
    opt = optim.SGD(0.1, momentum=0.9)
    for _ in range(2):
        opt.update(params, grads)
    assert int(opt.state["step"]) == 2 and float(opt.state["learning_rate"]) == pytest.approx(0.1)
    assert set(opt.state["~step"]) == {"v"} and set(opt.state["~learning_rate"]) == {"v"}
    np.testing.assert_allclose(params["step"], params["w"] - 2, rtol=1e-6)  # same update as "w"


def test_shrinking_a_list_of_parameters_keeps_working():
    opt = optim.SGD(0.1, momentum=0.9)
    opt.update({"l": [f32(1), f32(2)]}, {"l": [f32(1), f32(1)]})
    params = {"l": [f32(1)]}
    opt.update(params, {"l": [f32(1)]})
    assert len(opt.state["l"]) == 2  # stale state is kept, not an IndexError


# ---------------------------------------------------------------------------- structure
def test_tree_structure_is_kept():
    opt = optim.SGD(0.1, momentum=0.9)
    params = {
        "pair": Pair(f32(1), f32(2)),
        "t": (f32(3),),
        "blocks": {"0": f32(4), "1": f32(5)},
        "a.b": f32(6),
        7: f32(7),
        "od": OrderedDict(x=f32(8)),
    }
    grads = tree_map(lambda p: np.ones_like(p), params)
    new = opt.apply_gradients(grads, params)
    assert type(new["pair"]) is Pair and type(new["t"]) is tuple
    assert list(new) == list(params) and list(new["blocks"]) == ["0", "1"]
    assert type(opt.state["pair"]) is Pair and type(opt.state["t"]) is tuple
    assert set(opt.state["blocks"]) == {"0", "1"} and "a.b" in opt.state and 7 in opt.state


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.id)
def test_dtype_is_kept(setting, dtype):
    params = {"m": make(np.ones((3, 2)), "numpy", dtype), "v": make(np.ones(2), "numpy", dtype)}
    grads = tree_map(lambda p: p * p.dtype.type(0.5), params)
    opt = setting.make()
    new = opt.apply_gradients(grads, params)
    for path, value in tree_flatten({"new": new, "state": opt.state}):
        if path.removeprefix("state.") not in opt.scalars.names():  # step, lr, running values: float32
            assert value.dtype == params["m"].dtype, path


# ---------------------------------------------------------------------------- convergence
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.id)
def test_converges_on_a_quadratic(setting):
    rng = np.random.default_rng(0)
    target = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    params = {k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in target.items()}

    def loss():
        return sum(float(((params[k] - target[k]) ** 2).sum()) for k in params)

    start = loss()
    opt = setting.make()
    for _ in range(setting.convergence_steps):
        opt.update(params, {k: 2 * (params[k] - target[k]) for k in params})
    assert loss() < 0.25 * start, f"{setting.id}: {start:.3f} -> {loss():.3f}"


# ---------------------------------------------------------------------------- state
def test_state_round_trip_through_flatten_resumes_exactly():
    params = {"blocks": {"0": {"w": f32(1, 2)}, "1": {"w": f32(3, 4)}}, "drop": {}}
    grads = {"blocks": {"0": {"w": f32(1, 1)}, "1": {"w": f32(-1, 2)}}, "drop": {}}
    a, b = optim.Adam(0.1), optim.Adam(0.1)
    pa, pb = copy.deepcopy(params), copy.deepcopy(params)
    for _ in range(2):
        a.update(pa, grads)
    b.update(pb, grads)
    b.update(pb, grads)
    saved = tree_flatten(b.state)
    restored = optim.Adam(0.1)
    restored.state = tree_unflatten(saved)  # digit keys come back as a list; "drop" is lost
    for _ in range(3):
        a.update(pa, grads)
        restored.update(pb, grads)
    for (k, x), (_, y) in zip(tree_flatten(pa), tree_flatten(pb)):
        assert np.array_equal(x, y), k


def test_state_setter_checks_its_input():
    opt = optim.Adam(0.1)
    with pytest.raises(TypeError):
        opt.state = [1, 2]
    with pytest.raises(ValueError, match="missing 'step'"):
        opt.state = {"learning_rate": f32(0.1)}
    with pytest.raises(ValueError, match="missing 'learning_rate'"):
        opt.state = {"step": np.uint64(0)}


def test_a_loaded_slot_of_the_wrong_shape_is_an_error_not_a_broadcast():
    opt = optim.SGD(0.1, momentum=0.9)
    opt.state = {"step": np.uint64(0), "learning_rate": f32(0.1)[0], "w": {"v": f32(0)}}
    before = snapshot(opt.state)
    params = {"w": f32(1, 2, 3)}
    with pytest.raises(optim.ParameterError, match=r"slot 'v' of 'w' has shape \(1,\), expected \(3,\)"):
        opt.update(params, {"w": f32(1, 1, 1)})
    assert_same_state(before, opt.state)
    np.testing.assert_array_equal(params["w"], f32(1, 2, 3))


# ---------------------------------------------------------------------------- bad input
BAD_INPUTS = {
    "shape": (
        {"w": f32(1, 2)},
        {"w": f32(1, 2, 3)},
        r"gradient at 'w' has shape \(3,\) but the parameter has shape \(2,\)",
    ),
    "dtype": (
        {"w": f32(1, 2)},
        {"w": np.ones(2, np.float64)},
        "gradient at 'w' is float64 but the parameter is float32",
    ),
    "missing": ({"w": f32(1)}, {"w": f32(1), "x": {"y": f32(1)}}, "gradient for 'x.y' but no parameter"),
    "not an array": ({"w": f32(1)}, {"w": "one"}, "gradient at 'w' is a str"),
    "integer parameter": ({"w": np.ones(2, np.int32)}, {"w": np.ones(2, np.int32)}, "'w' has dtype int32"),
    "sub-tree vs leaf": ({"w": f32(1)}, {"w": {"a": f32(1)}}, "sub-tree at 'w'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_the_path_and_changes_nothing(case):
    extra_params, bad_grads, message = BAD_INPUTS[case]
    params = {"ok": f32(1, 1), **extra_params}
    opt = optim.Adam(0.1)
    trainable = {k: np.ones_like(v) for k, v in params.items() if v.dtype.kind == "f"}
    opt.update(params, trainable)  # a good step first: the state has something to lose
    before, values = snapshot(opt.state), snapshot(params)
    with pytest.raises(optim.ParameterError, match=message) as raised:
        opt.update(params, {"ok": f32(1, 1), **bad_grads})
    assert raised.value.path is not None
    assert_same_state(before, opt.state)
    assert_same_state(values, params)


@pytest.mark.parametrize("other", backend_params(["torch", "jax", "mlx"]))
def test_arrays_of_two_libraries_are_an_error(other):
    opt = optim.SGD(0.1, momentum=0.9)
    params = {"a": f32(1), "b": make([1.0], other)}
    with pytest.raises(optim.ParameterError, match=f"'b' is a {other} array, but 'a' is a numpy array"):
        opt.update(params, {"a": f32(1), "b": make([1.0], other)})
    assert int(opt.step) == 0 and set(opt.state) == {"step", "learning_rate"}
    with pytest.raises(optim.ParameterError, match=f"gradient at 'a' is a {other} array but the parameter is a numpy"):
        opt.update({"a": f32(1)}, {"a": make([1.0], other)})
    opt.update({"a": f32(1)}, {"a": f32(1)})
    with pytest.raises(optim.ParameterError, match=f"the optimizer state holds numpy array"):
        opt.update({"a": make([1.0], other)}, {"a": make([1.0], other)})


def test_gradients_must_be_a_tree():
    with pytest.raises(TypeError, match="expected a tree"):
        optim.SGD(0.1).apply_gradients(f32(1), f32(1))


# ---------------------------------------------------------------------------- MLX-style subclasses
class SignSGD(optim.Optimizer):
    """Written as for mlx.optimizers: init_single and apply_single."""

    def __init__(self, learning_rate):
        super().__init__()
        self._maybe_schedule("learning_rate", learning_rate)

    def init_single(self, parameter, state):
        state["calls"] = np.zeros((), np.float32)

    def apply_single(self, gradient, parameter, state):
        state["calls"] = state["calls"] + 1
        return parameter - self.learning_rate.astype(gradient.dtype) * np.sign(gradient)


def test_subclasses_written_for_mlx_work():
    opt = SignSGD(0.5)
    params = {"w": f32(1, 1)}
    for _ in range(2):
        opt.update(params, {"w": f32(3, -2)})
    np.testing.assert_array_equal(params["w"], f32(0, 2))
    assert float(opt.state["w"]["calls"]) == 2


def test_apply_single_of_a_builtin_follows_mlx():
    opt = optim.SGD(0.1, momentum=0.9)
    state = {}
    opt.init_single(f32(1, 2), state)
    new = opt.apply_single(f32(1, 1), f32(1, 2), state)
    np.testing.assert_allclose(new, f32(0.9, 1.9))
    np.testing.assert_array_equal(state["v"], f32(1, 1))


def test_muon_bfloat16_newton_schulz_is_opt_in_and_close():
    pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((16, 48)).astype(np.float32)}
    grads = {"w": rng.standard_normal((16, 48)).astype(np.float32)}
    exact, low = optim.Muon(0.1), optim.Muon(0.1, ns_dtype="bfloat16")
    a, b = exact.apply_gradients(grads, params)["w"], low.apply_gradients(grads, params)["w"]
    assert a.dtype == b.dtype == np.float32 and not np.array_equal(a, b)
    step_a, step_b = a - params["w"], b - params["w"]
    assert np.linalg.norm(step_a - step_b) / np.linalg.norm(step_a) < 0.05
    with pytest.raises(ValueError, match="Muon ns_dtype"):
        optim.Muon(0.1, ns_dtype="int8")


@pytest.mark.parametrize("backend", backend_params())
def test_python_numbers_and_zero_d_arrays_work_on_every_backend(backend):
    opt = optim.Adam(0.1)
    params = {"scalar": make(2.0, backend), "number": 3.0, "w": make([1.0, 2.0], backend)}
    grads = {"scalar": make(1.0, backend), "number": make(1.0, backend), "w": 1.0}
    with pytest.raises(optim.ParameterError, match="gradient at 'w' has shape"):
        opt.apply_gradients(grads, params)  # a number is a 0-d gradient, not a broadcast
    grads["w"] = make([1.0, 1.0], backend)
    new = opt.apply_gradients(grads, params)
    for key, expected in (("scalar", 2.0), ("number", 3.0)):
        value = as_float64(new[key])
        step = 0.1 * 0.1 / (0.001**0.5 + 1e-8)  # lr * m / (sqrt(v) + eps) after one Adam step
        assert value.shape == () and value == pytest.approx(expected - step, rel=1e-5)
    assert type(new["scalar"]) is type(params["scalar"]) and type(new["number"]) is type(params["scalar"])
