"""Checkpoints of compact state: the file keeps the codes and scales; a file loads into an
optimizer of any state_dtype (read back, and stored anew); MLX's layout gets float arrays; a
file whose codes and scales do not fit is refused with the key, before anything changes."""

import json

import ml_dtypes
import numpy as np
import pytest

import treeopt as optim
from tests.test_precision import reference_int8
from treeopt import checkpoint
from treeopt.checkpoint.base import CheckpointError

pytest.importorskip("safetensors")

SHAPES = {"embed": (64, 128), "blocks": [{"w": (96, 64), "b": (64,)}], "lm_head": {"weight": (64, 128)}}


def _params(seed=0):
    rng = np.random.default_rng(seed)

    def make(node):
        if isinstance(node, dict):
            return {k: make(v) for k, v in node.items()}
        if isinstance(node, list):
            return [make(v) for v in node]
        return rng.standard_normal(node).astype(np.float32)

    return make(SHAPES)


def _trained(state_dtype, steps=3):
    params = _params()
    opt = optim.muon_adamw(params, state_dtype=state_dtype)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        opt.update(params, optim.tree.tree_map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params))
    return opt, params


def test_the_file_keeps_codes_and_scales(tmp_path):
    opt, params = _trained("int8")
    checkpoint.save(opt, tmp_path / "opt.safetensors")
    tensors, metadata = checkpoint.read(tmp_path / "opt.safetensors")
    assert tensors["embed/m"].dtype == np.int8 and tensors["embed/v"].dtype == np.uint8
    assert tensors["embed/m_scale"].dtype == np.float32 and tensors["embed/m_scale"].shape == (64, 1)
    assert metadata["format_version"] == 2
    assert metadata["optimizers"][0]["state_dtype"] == {"dtype": "int8", "seed": 0, "block": 256, "min_size": 4096}
    again = optim.muon_adamw(_params(), state_dtype="int8")
    checkpoint.load(again, tmp_path / "opt.safetensors", params=params)
    for name, value in optim.tree.tree_flatten(opt.state):
        np.testing.assert_array_equal(dict(optim.tree.tree_flatten(again.state))[name], value)


@pytest.mark.parametrize("source", [None, "bfloat16", "int8"])
@pytest.mark.parametrize("target", [None, "bfloat16", "int8"])
def test_a_file_loads_into_any_state_dtype(tmp_path, source, target):
    opt, params = _trained(source)
    checkpoint.save(opt, tmp_path / "opt.safetensors")
    loaded = optim.muon_adamw(_params(), state_dtype=target)
    report = checkpoint.load(loaded, tmp_path / "opt.safetensors", params=params)
    assert report.ok
    # what the source held, read back in float64 from its own stored form
    source_values = _read_back(opt)
    target_values = _read_back(loaded)
    for key, value in source_values.items():
        expected = value
        if target == "int8" and key.split("/")[0] in ("embed", "lm_head.weight", "blocks.0.w"):
            # requantised: the codes of the source's values, from the definition
            signed = key.endswith("/m") or key == "blocks.0.w/v"
            expected = reference_int8(value.astype(np.float32), signed, 256)[2]
            same = np.isclose(target_values[key], expected, rtol=1e-6, atol=1e-30)
            assert np.mean(same) > 0.999  # float32 and float64 may disagree on a tie: one code apart
            np.testing.assert_allclose(target_values[key], expected, rtol=0.05)
        elif target == "bfloat16":
            nearest = value.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
            np.testing.assert_array_equal(target_values[key], nearest)
        else:
            np.testing.assert_array_equal(target_values[key], value.astype(np.float32))
    # the steps continue from the loaded state
    assert int(loaded.step) == int(opt.step)


def _read_back(opt):
    """Every slot of a muon_adamw, read back into float64 from its stored form."""
    out = {}
    for _, _, group in opt.groups():
        store = group.store
        for keys, slots in store.items():
            shape, dtype = store.parameters[keys]
            layout = store.layout(shape, dtype, keys)
            path = ".".join(map(str, keys))
            for slot in store.slot_shapes(shape):
                if layout is None:
                    out[f"{path}/{slot}"] = np.asarray(slots[slot], np.float64)
                else:
                    out[f"{path}/{slot}"] = layout.forms[slot].load(
                        optim.backends.numpy_backend, slots, slot, "float64"
                    )
    return out


def test_mlx_layout_export_reads_back_float_slots(tmp_path):
    opt, _ = _trained("int8")
    arrays = checkpoint.mlx_layout.to_mlx(opt)
    assert arrays["states.2.embed.m"].dtype == np.float32 and "states.2.embed.m_scale" not in arrays
    np.testing.assert_array_equal(arrays["states.2.embed.m"], _read_back(opt)["embed/m"].astype(np.float32))
    assert arrays["states.0.blocks.0.w.v"].shape == (96, 64)


def _corrupt(tmp_path, edit):
    opt, params = _trained("int8")
    checkpoint.save(opt, tmp_path / "opt.safetensors")
    tensors, metadata = checkpoint.read(tmp_path / "opt.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    edit(tensors, metadata)
    return tensors, metadata, params


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t, m: (
                t.__setitem__("embed/m_scale", np.zeros((32, 1), np.float32)),
                m["parameters"]["embed"]["slots"].__setitem__("m_scale", {"shape": [32, 1], "dtype": "float32"}),
            ),
            r"embed/m.*'m_scale' is float32\[32, 1\]; codes of shape \[64, 128\] in blocks of 256 need float32\[64, 1\]",
        ),
        (
            lambda t, m: (t.pop("embed/v_scale"), m["parameters"]["embed"]["slots"].pop("v_scale")),
            r"embed/v.*'v' holds uint8 codes but there is no 'v_scale'",
        ),
    ],
    ids=["scale shape", "scale missing"],
)
def test_codes_and_scales_that_do_not_fit_are_refused(tmp_path, edit, message):
    tensors, metadata, params = _corrupt(tmp_path, edit)
    target = optim.muon_adamw(_params(), state_dtype=None)  # another form: the file is read back
    before = {k: np.array(v) for k, v in optim.tree.tree_flatten(target.state)}
    with pytest.raises(CheckpointError, match=message):
        checkpoint.from_flat(target, tensors, metadata)
    for k, v in optim.tree.tree_flatten(target.state):
        np.testing.assert_array_equal(v, before[k])


def test_a_state_dtype_that_is_not_one_is_refused(tmp_path):
    def edit(t, m):
        m["optimizers"][0]["state_dtype"]["dtype"] = "int4"

    tensors, metadata, _ = _corrupt(tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"'optimizers\[0\].state_dtype'.*'int4' was provided"):
        checkpoint.from_flat(optim.muon_adamw(_params()), tensors, metadata)
    json.dumps(metadata)
