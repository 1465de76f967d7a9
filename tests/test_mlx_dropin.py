"""Code written for mlx.optimizers runs unchanged with ``import treeopt as optim``:
nn.Module updates, state read/written/assigned, mx.compile (pure and impure, with and
without init), learning-rate changes without retracing, safetensors round trips."""

from functools import partial
from types import SimpleNamespace

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


def compiled_update(model, opt):
    """The step MLX's examples compile: the model's and the optimizer's state captured."""
    state = [model.state, opt.state]
    grad_fn = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = grad_fn(model, x, y)
        opt.update(model, grads)
        return loss

    return state, step


@pytest.mark.parametrize("init_first", [False, True])
def test_impure_compile_matches_eager(init_first):
    eager, _, _ = train_eager(lambda: muon_adamw(optim))
    model, opt = make_model(), muon_adamw(optim)
    if init_first:
        opt.init(model.trainable_parameters())
    state, step = compiled_update(model, opt)
    for _ in range(3):
        step(*data())
        mx.eval(state)
    assert_same_parameters(model, eager, tol=1e-6)
    assert opt.step.item() == 3


def test_kinds_learned_inside_a_compiled_step_move_no_route():
    """Routes decided from a dict of parameters, then the model itself given inside
    mx.compile: its kinds (the first layer reads the input, the last writes the output) would
    move two routes, which cannot happen while the step is traced: a warning says so."""
    model, opt = make_model(), optim.muon_adamw()
    opt.init(model.trainable_parameters())  # by names and shapes: matrices in numbered layers are hidden
    paths = ["layers.0.weight", "layers.3.weight", "layers.5.weight"]
    before = [opt.names[opt.route(p)] for p in paths]
    assert before == ["muon", "muon", "muon"]
    state, step = compiled_update(model, opt)
    with pytest.warns(optim.RoutingWarning, match="compiled function is being traced"):
        step(*data())
    mx.eval(state)
    assert [opt.names[opt.route(p)] for p in paths] == before and opt.step.item() == 1


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


# ---------------------------------------------------------------------------------- mlx-lm's LoRA training
class _Tokens:
    """A dataset as mlx-lm's tuner reads one: rows of token ids, each processed to ``(ids, offset)``."""

    def __init__(self, rows):
        self.rows = rows

    def process(self, row):
        return (row, 0)

    def __getitem__(self, i):
        return self.rows[i]

    def __len__(self):
        return len(self.rows)


def _tiny_llama():
    """The routing corpus's mlx-lm Llama: built from a config, random weights, no download."""
    pytest.importorskip("mlx_lm")
    import routing_corpus

    model, _ = next(case for case in routing_corpus.CASES if case.name == "mlx-lm llama").build()
    return model


def _token_rows(count=8):
    rng = np.random.default_rng(0)
    return [rng.integers(1, 64, size=int(n)).tolist() for n in rng.integers(8, 20, size=count)]


def _lora_run(optimizers, name, adapter_path, monkeypatch):
    """``mlx_lm.lora``'s own training (LoRA layers from its tuner, its compiled step, its batches)
    of a tiny random Llama for 4 steps, with ``optimizers`` as the module it builds the optimizer
    from: the trainable parameters and the losses it reported."""
    lora = pytest.importorskip("mlx_lm.lora")
    from mlx_lm.tuner.callbacks import TrainingCallback

    class Losses(TrainingCallback):
        def __init__(self):
            self.reported = []

        def on_train_loss_report(self, info):
            self.reported.append(info["train_loss"])

        def on_val_loss_report(self, info):
            self.reported.append(info["val_loss"])

    settings = {
        **lora.CONFIG_DEFAULTS,
        "optimizer": name,
        "num_layers": 2,
        "batch_size": 2,
        "iters": 4,
        "val_batches": 1,
        "steps_per_report": 2,
        "steps_per_eval": 4,
        "learning_rate": 1e-2,
        "max_seq_length": 32,
        "adapter_path": str(adapter_path),
        "lr_schedule": None,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
    }
    model, rows, losses = _tiny_llama(), _token_rows(), Losses()
    np.random.seed(0)  # the tuner shuffles its batches with NumPy's global generator
    monkeypatch.setattr(lora, "optim", optimizers)
    lora.train_model(SimpleNamespace(**settings), model, _Tokens(rows[:6]), _Tokens(rows[6:]), losses)
    monkeypatch.undo()
    return dict(tree_flatten(model.trainable_parameters())), losses.reported


@pytest.mark.parametrize("name", ["adam", "adamw", "muon", "sgd", "adafactor"])
def test_mlx_lm_lora_training_with_treeopt_is_bit_identical(name, tmp_path, monkeypatch):
    """Every optimizer ``mlx_lm.lora`` offers, built from ``treeopt`` instead of
    ``mlx.optimizers``: the same adapters, bit for bit, and the same losses."""
    expected, expected_losses = _lora_run(mlx_optim, name, tmp_path / "mlx", monkeypatch)
    got, losses = _lora_run(optim, name, tmp_path / "treeopt", monkeypatch)
    assert list(got) == list(expected) and any(k.endswith("lora_b") for k in got)
    for path, value in expected.items():
        assert np.array_equal(np.array(got[path]), np.array(value)), path
    assert any(np.abs(np.array(v)).max() > 0 for k, v in got.items() if k.endswith("lora_b"))  # it trained
    assert losses == expected_losses


def test_mlx_lm_lora_step_with_a_multioptimizer_is_bit_identical():
    """LoRA layers from mlx-lm's tuner, its loss and batches, and its trainer's compiled step,
    with a MultiOptimizer of Muon for the matrices and AdamW for the rest: treeopt's against
    MLX's. (mlx-lm's ``train`` itself reports ``optimizer.learning_rate.item()``, which a
    treeopt MultiOptimizer gives as a list, one per group: see docs/differences-from-mlx.md.)"""
    pytest.importorskip("mlx_lm")
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.trainer import default_loss, iterate_batches
    from mlx_lm.tuner.utils import linear_to_lora_layers

    def run(module):
        model = _tiny_llama()
        model.freeze()
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
        opt = module.MultiOptimizer(
            [module.Muon(0.02), module.AdamW(0.01)], [lambda path, w: w.ndim == 2 and "lora_a" in path]
        )
        loss_and_grad = nn.value_and_grad(model, default_loss)
        state = [model.state, opt.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(batch, lengths):  # the trainer's step, without accumulation
            (loss, _), grad = loss_and_grad(model, batch, lengths)
            opt.update(model, grad)
            return loss

        batches = iterate_batches(CacheDataset(_Tokens(_token_rows())), 2, 32, loop=True, seed=0)
        losses = []
        for _, (batch, lengths) in zip(range(4), batches):
            losses.append(step(batch, lengths))
            mx.eval(state, losses)
        return dict(tree_flatten(model.trainable_parameters())), [loss.item() for loss in losses]

    (expected, expected_losses), (got, losses) = run(mlx_optim), run(optim)
    assert list(got) == list(expected) and losses == expected_losses
    for path, value in expected.items():
        assert np.array_equal(np.array(got[path]), np.array(value)), path
    assert any(np.abs(np.array(v)).max() > 0 for k, v in got.items() if k.endswith("lora_b"))  # it trained
