"""The public surface: mlx.optimizers' names, signatures and defaults; nothing stray; no
framework imported by ``import treeopt``."""

import inspect
import subprocess
import sys
import types

import pytest

import treeopt as optim
import treeopt.tree

MLX_NAMES = [
    "Optimizer",
    "MultiOptimizer",
    "SGD",
    "RMSprop",
    "Adagrad",
    "AdaDelta",
    "Adam",
    "AdamW",
    "Adamax",
    "Lion",
    "Adafactor",
    "Muon",
    "clip_grad_norm",
    "exponential_decay",
    "step_decay",
    "cosine_decay",
    "linear_schedule",
    "join_schedules",
]
TREE_NAMES = ["tree_map", "tree_map_with_path", "tree_flatten", "tree_unflatten", "tree_reduce", "tree_merge"]


def comparable(default):
    return tuple(default) if isinstance(default, (list, tuple)) else default


@pytest.mark.parametrize("name", MLX_NAMES)
def test_signatures_and_defaults_match_mlx(name):
    mlx_optim = pytest.importorskip("mlx.optimizers")
    ours, theirs = inspect.signature(getattr(optim, name)), inspect.signature(getattr(mlx_optim, name))
    positional = [p for p in ours.parameters.values() if p.kind is not p.KEYWORD_ONLY]  # extensions are keyword-only
    assert [p.name for p in positional] == list(theirs.parameters)
    for param in theirs.parameters.values():
        assert comparable(ours.parameters[param.name].default) == comparable(param.default), param.name


@pytest.mark.parametrize("name", TREE_NAMES)
def test_tree_signatures_match_mlx_utils(name):
    mlx_utils = pytest.importorskip("mlx.utils")
    ours, theirs = inspect.signature(getattr(treeopt.tree, name)), inspect.signature(getattr(mlx_utils, name))
    assert [(p.name, p.default) for p in ours.parameters.values()] == [
        (p.name, p.default) for p in theirs.parameters.values()
    ]


def test_no_stray_public_names():
    public = {n for n in dir(optim) if not n.startswith("_")}
    modules = {n for n in public if isinstance(getattr(optim, n), types.ModuleType)}
    assert set(MLX_NAMES) <= set(optim.__all__)
    assert public - modules <= set(optim.__all__), public - modules - set(optim.__all__)
    for stray in ("Callable", "List", "mx", "math", "np", "numbers"):
        assert not hasattr(optim, stray)
    assert sorted(treeopt.tree.__all__) == sorted(TREE_NAMES)


def test_importing_treeopt_imports_no_framework():
    code = "import sys, treeopt, treeopt.tree; print(sorted(m for m in ('torch', 'jax', 'mlx', 'ml_dtypes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
