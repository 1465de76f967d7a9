"""treeopt.checkpoint.mlx_layout: the ``tree_flatten(optimizer.state)`` layout MLX users have,
both ways."""

import numpy as np
import pytest

import treeopt as optim
from arrays import as_float64, available, backend_params
from checkpoint_helpers import (
    assert_bit_identical,
    assert_close,
    flat,
    grads_for,
    is_layer_matrix,
    model_values,
    muon_adamw,
    numpy_of,
    on,
    slots_by_path,
    train,
)
from treeopt import checkpoint
from treeopt.backends import backend_of
from treeopt.tree import tree_flatten, tree_map

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.RoutingWarning")


# ------------------------------------------------------------------------------ 6. MLX and torch interoperability
needs_mlx = pytest.mark.skipif(not available("mlx"), reason="mlx is not installed")


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
    from mlx.utils import tree_flatten as mlx_tree_flatten, tree_unflatten as mlx_tree_unflatten

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
