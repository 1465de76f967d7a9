"""The examples run: a short real training loop each, on a few steps."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
NEEDS = {"torch_digits": ["torch"], "jax_optax_digits": ["jax", "optax"], "mlx_digits": ["mlx.core"]}


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_example_trains(name, capsys):
    for module in NEEDS[name]:
        pytest.importorskip(module, reason=f"{name} needs {module}")
    loss, accuracy = load(name).main(steps=60)
    assert loss < 1.0 and accuracy > 0.7
    assert "test accuracy" in capsys.readouterr().out
