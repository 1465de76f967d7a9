"""The examples run: a short real training loop each, on a few steps."""

import importlib.util
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
NEEDS = {
    "numpy_digits": [],
    "torch_digits": ["torch"],
    "jax_optax_digits": ["jax", "optax"],
    "mlx_digits": ["mlx.core"],
}


def load(name, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/x.py` runs: its folder first on the path
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_example_trains(name, capsys, monkeypatch):
    for module in NEEDS[name]:
        pytest.importorskip(module, reason=f"{name} needs {module}")
    loss, accuracy = load(name, monkeypatch).main(steps=60)
    assert loss < 1.0 and accuracy > 0.7
    assert "test accuracy" in capsys.readouterr().out


def test_the_numpy_example_backward_pass_matches_finite_differences(monkeypatch):
    example = load("numpy_digits", monkeypatch)
    rng = np.random.default_rng(0)
    params = example.init_params(sizes=(6, 5, 5, 4), dtype=np.float64)
    for layer in params.values():  # non-zero biases, so their gradients are checked for real
        layer["bias"] += rng.standard_normal(layer["bias"].shape)
    x, labels = rng.standard_normal((7, 6)), rng.integers(0, 4, 7)
    _, grads = example.loss_and_grads(params, x, labels)
    eps = 1e-6
    for name, layer in params.items():
        for kind, value in layer.items():
            numeric = np.zeros_like(value)
            for index in np.ndindex(value.shape):
                saved = value[index]
                value[index] = saved + eps
                above = example.loss_and_grads(params, x, labels)[0]
                value[index] = saved - eps
                below = example.loss_and_grads(params, x, labels)[0]
                value[index] = saved
                numeric[index] = (above - below) / (2 * eps)
            np.testing.assert_allclose(grads[name][kind], numeric, rtol=1e-5, atol=1e-8, err_msg=f"{name}.{kind}")


def test_the_examples_data_is_the_digits_split_by_seed(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from digits_data import train_test_split

    x_train, y_train, x_test, y_test = train_test_split(seed=3)
    assert x_train.shape == (1438, 64) and x_test.shape == (359, 64) and x_train.dtype == np.float32
    assert sorted(set(y_train.tolist())) == list(range(10)) and y_test.dtype == np.int64
    assert abs(float(x_train.mean())) < 1e-5 and float(x_train.std()) == pytest.approx(1.0, rel=1e-4)
    again = train_test_split(seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((x_train, y_train, x_test, y_test), again))
    assert not np.array_equal(train_test_split(seed=4)[1], y_train)
