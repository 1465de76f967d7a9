"""Code written for mlx.optimizers runs unchanged with ``import treeopt as optim``:
nn.Module updates, state read/written/assigned, mx.compile (pure and impure, with and
without init), learning-rate changes without retracing, safetensors round trips."""

from functools import partial

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="MLX drop-in tests need mlx")
nn = pytest.importorskip("mlx.nn")
import mlx.optimizers as mlx_optim  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

import treeopt as optim  # noqa: E402


def make_model(seed=0):
    mx.random.seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.0), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    mx.eval(model.parameters())
    return model


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x), y)


def data():
    mx.random.seed(1)
    return mx.random.normal((16, 4)), mx.random.normal((16, 2))


def muon_adamw(module):
    return module.MultiOptimizer(
        [module.Muon(0.02), module.AdamW(0.01)], [lambda path, w: w.ndim == 2 and not path.startswith("layers.5")]
    )


def train_eager(make_optimizer, steps=3, model=None):
    model = model or make_model()
    opt = make_optimizer()
    step = nn.value_and_grad(model, loss_fn)
    x, y = data()
    losses = []
    for _ in range(steps):
        loss, grads = step(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    return model, opt, losses


def assert_same_parameters(a, b, tol=0.0):
    for (path, x), (_, y) in zip(tree_flatten(a.parameters()), tree_flatten(b.parameters())):
        assert mx.abs(x - y).max().item() <= tol, path


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Lion", "Muon", "Adafactor"])
def test_module_update_matches_mlx(name):
    kwargs = {} if name == "Adafactor" else {"learning_rate": 0.01}
    ours, _, _ = train_eager(lambda: getattr(optim, name)(**kwargs))
    theirs, _, _ = train_eager(lambda: getattr(mlx_optim, name)(**kwargs))
    assert_same_parameters(ours, theirs, tol=1e-6)


def test_multioptimizer_trains_a_module_with_parameterless_and_frozen_layers():
    model = make_model()
    model.layers[0].freeze()
    frozen = mx.array(model.layers[0].weight)
    model, opt, losses = train_eager(lambda: muon_adamw(optim), steps=20, model=model)
    assert losses[-1] < losses[0]
    assert mx.array_equal(model.layers[0].weight, frozen)
    muon_state, adamw_state = opt.state["states"]
    assert "weight" in muon_state["layers"][3] and "bias" in adamw_state["layers"][3]
    assert "weight" not in muon_state["layers"][0]  # frozen: no state anywhere
    model.layers[0].unfreeze()
    loss, grads = nn.value_and_grad(model, loss_fn)(model, *data())
    opt.update(model, grads)  # newly trainable parameters are initialised, not a KeyError
    assert "weight" in opt.state["states"][0]["layers"][0]


def test_state_read_written_and_assigned():
    model, opt, _ = train_eager(lambda: optim.Adam(0.01), steps=2)
    assert opt.state["layers"][0]["weight"]["m"].shape == (8, 4)
    opt.state["layers"][0]["weight"]["m"] = mx.zeros((8, 4))
    assert opt.state["layers"][0]["weight"]["m"].sum().item() == 0
    saved = dict(tree_flatten(opt.state))
    fresh = optim.Adam(0.5)
    fresh.state = tree_unflatten(list(saved.items()))
    assert fresh.learning_rate.item() == pytest.approx(0.01)  # the loaded value wins
    assert fresh.step.item() == 2 and fresh.step.dtype == mx.uint64


@pytest.mark.parametrize("init_first", [False, True])
def test_impure_compile_matches_eager(init_first):
    eager, _, _ = train_eager(lambda: muon_adamw(optim))
    model, opt = make_model(), muon_adamw(optim)
    if init_first:
        opt.init(model.trainable_parameters())
    state = [model.state, opt.state]
    grad_fn = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = grad_fn(model, x, y)
        opt.update(model, grads)
        return loss

    for _ in range(3):
        step(*data())
        mx.eval(state)
    assert_same_parameters(model, eager, tol=1e-6)
    assert opt.step.item() == 3


def test_pure_compile_matches_eager():
    eager, _, _ = train_eager(lambda: optim.SGD(0.1, momentum=0.9))
    model, opt = make_model(), optim.SGD(0.1, momentum=0.9)
    opt.init(model.trainable_parameters())
    grad_fn = nn.value_and_grad(model, loss_fn)

    @mx.compile
    def step(params, opt_state, x, y):
        model.update(params)
        opt.state = opt_state
        loss, grads = grad_fn(model, x, y)
        opt.update(model, grads)
        return model.parameters(), opt.state, loss

    params, opt_state = model.parameters(), opt.state
    for _ in range(3):
        params, opt_state, _ = step(params, opt_state, *data())
    model.update(params)
    assert_same_parameters(model, eager, tol=1e-6)


def test_learning_rate_changes_inside_compiled_step_without_retracing():
    opt = optim.SGD(-1.0)
    opt.init({"w": mx.array(1.0)})
    traces = []

    @partial(mx.compile, inputs=opt.state, outputs=opt.state)
    def apply(w, g):
        traces.append(1)
        return opt.apply_gradients({"w": g}, {"w": w})["w"]

    w = apply(mx.array(1.0), mx.array(1.0))
    assert w.item() == 2.0
    opt.learning_rate = -2.0
    w = apply(mx.array(1.0), mx.array(1.0))
    assert w.item() == 3.0 and len(traces) == 1


def test_compiled_schedule_advances():
    schedule = optim.exponential_decay(0.1, 0.5)
    opt = optim.SGD(schedule)
    opt.init({"w": mx.zeros(2)})

    @partial(mx.compile, inputs=opt.state, outputs=opt.state)
    def apply(w, g):
        return opt.apply_gradients({"w": g}, {"w": w})["w"]

    for step in range(4):
        apply(mx.zeros(2), mx.ones(2))
        assert opt.learning_rate.item() == pytest.approx(schedule(step))


def test_safetensors_round_trip_resumes_exactly(tmp_path):
    model_a, opt_a, _ = train_eager(lambda: muon_adamw(optim), steps=2)
    model_b, opt_b, _ = train_eager(lambda: muon_adamw(optim), steps=2)
    path = str(tmp_path / "opt.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(opt_b.state)))
    restored = muon_adamw(optim)
    restored.state = tree_unflatten(list(mx.load(path).items()))
    grad_fn_a, grad_fn_b = nn.value_and_grad(model_a, loss_fn), nn.value_and_grad(model_b, loss_fn)
    for _ in range(3):
        opt_a.update(model_a, grad_fn_a(model_a, *data())[1])
        restored.update(model_b, grad_fn_b(model_b, *data())[1])
        mx.eval(model_a.parameters(), model_b.parameters())
    assert_same_parameters(model_a, model_b)
    assert np.array_equal(np.array(restored.step), np.array(opt_a.step))


def test_compiled_step_on_a_fresh_optimizer_captures_step_and_schedule():
    # no parameter has been seen, yet the step and the learning rate are MLX arrays already:
    # mx.compile only tracks the arrays it finds in `inputs` when it is first called
    schedule = optim.cosine_decay(0.2, 5)
    opt = optim.Adam(schedule)
    assert isinstance(opt.step, mx.array) and isinstance(opt.learning_rate, mx.array)

    @partial(mx.compile, inputs=opt.state, outputs=opt.state)
    def tick():
        opt.update({}, {})

    for step in range(4):
        tick()
        assert opt.learning_rate.item() == pytest.approx(schedule(step).item(), rel=1e-6)
    assert opt.step.item() == 4


def test_fresh_scalars_move_to_the_library_of_the_first_parameters():
    opt = optim.SGD(optim.exponential_decay(0.1, 0.5))  # MLX is loaded: its scalars start in MLX
    params = {"w": np.ones(3, np.float32)}
    opt.update(params, {"w": np.ones(3, np.float32)})
    opt.update(params, {"w": np.ones(3, np.float32)})
    assert all(isinstance(v, (np.ndarray, np.generic)) for v in (opt.step, opt.learning_rate))
    np.testing.assert_allclose(params["w"], 1 - 0.1 - 0.05)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: m.exponential_decay(0.3, 0.8),
        lambda m: m.step_decay(0.3, 0.5, 2),
        lambda m: m.cosine_decay(0.3, 6),
        lambda m: m.linear_schedule(0.1, 0.4, 5),
        lambda m: m.join_schedules([m.linear_schedule(0.0, 0.3, 3), m.cosine_decay(0.3, 4)], [3]),
    ],
    ids=["exponential", "step", "cosine", "linear", "joined"],
)
def test_schedule_values_have_item_as_mlx_arrays_do(make):
    ours, theirs = make(optim), make(mlx_optim)
    for step in range(8):
        expected = theirs(step)
        expected = expected.item() if isinstance(expected, mx.array) else expected
        assert ours(step).item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_joined_plain_functions_give_items_too():
    joined = optim.join_schedules([lambda _: 7, lambda _: 9], [3])
    assert [joined(step).item() for step in range(5)] == [7, 7, 7, 9, 9]


@pytest.mark.parametrize("library", ["numpy", "mlx"])
def test_adafactor_factored_preconditioner_is_mlx_s(library):
    row = np.array([[4.0, 1.0], [9.0, 9.0]], np.float32)  # two matrices of 2 rows, 3 columns
    col = np.array([[1.0, 16.0, 4.0], [25.0, 1.0, 9.0]], np.float32)
    r = 1 / np.sqrt(row / row.mean(axis=-1, keepdims=True))
    expected = r[:, :, None] / np.sqrt(col)[:, None, :]
    make = np.asarray if library == "numpy" else mx.array
    ours = optim.Adafactor()._approximate_exp_moving_avg(make(row), make(col))
    theirs = mlx_optim.Adafactor()._approximate_exp_moving_avg(mx.array(row), mx.array(col))
    np.testing.assert_allclose(np.array(ours), expected, rtol=1e-6)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-6)


def test_a_state_without_step_is_refused_unlike_mlx():
    # the one deliberate difference MLX's own suite meets (docs/differences-from-mlx.md)
    opt = optim.SGD(0.1)
    with pytest.raises(ValueError, match="SGD.state is missing 'step', 'learning_rate'"):
        opt.state = {0: 1}
    assert opt.step.item() == 0
