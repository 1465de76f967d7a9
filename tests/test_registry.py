"""The registry's own claims, tested: every constructor error it lists is raised with its
message (and by MLX too where the registry says so), and its capability flags are true."""

import importlib.util

import pytest

import treeopt as optim
from registry import CAPABILITIES, ERRORS, OPTIMIZERS, SETTINGS

_MLX = importlib.util.find_spec("mlx") is not None


def _error_id(case):
    optimizer, kwargs, _, _, _ = case
    return f"{optimizer}({','.join(f'{k}={v}' for k, v in kwargs.items())})"


@pytest.mark.parametrize("optimizer, kwargs, error, message, mlx_raises", ERRORS, ids=map(_error_id, ERRORS))
def test_constructor_errors(optimizer, kwargs, error, message, mlx_raises):
    with pytest.raises(error, match=message):
        getattr(optim, optimizer)(**kwargs)


@pytest.mark.skipif(not _MLX, reason="MLX is not installed")
@pytest.mark.parametrize(
    "optimizer, kwargs, error, message, mlx_raises",
    [case for case in ERRORS if CAPABILITIES[case[0]].mlx_reference],
    ids=map(_error_id, [case for case in ERRORS if CAPABILITIES[case[0]].mlx_reference]),
)
def test_mlx_raises_exactly_where_the_registry_says(optimizer, kwargs, error, message, mlx_raises):
    import mlx.optimizers as mlx_optim

    try:
        getattr(mlx_optim, optimizer)(**kwargs)
    except Exception:
        raised = True
    else:
        raised = False
    assert raised == mlx_raises


def test_every_optimizer_has_capabilities_settings_and_errors():
    exported = {
        name
        for name in optim.__all__
        if isinstance(getattr(optim, name), type)
        and issubclass(getattr(optim, name), optim.Optimizer)
        and getattr(optim, name).rule is not None
    }
    assert exported == set(CAPABILITIES) == set(OPTIMIZERS)
    assert {case[0] for case in ERRORS} <= exported
    for setting in SETTINGS:
        assert setting.make().rule.elementwise == setting.capabilities.elementwise, setting.id


@pytest.mark.skipif(not _MLX, reason="MLX is not installed")
def test_mlx_reference_flag_says_whether_mlx_has_the_optimizer():
    import mlx.optimizers as mlx_optim

    for name, capabilities in CAPABILITIES.items():
        assert hasattr(mlx_optim, name) == capabilities.mlx_reference, name
        assert capabilities.mlx_reference or capabilities.reference is not None, f"{name} is checked against nothing"
