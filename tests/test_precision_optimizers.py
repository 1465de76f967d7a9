"""``state_dtype=`` on every optimizer and backend, against a float64 reference of the
quantised arithmetic: the rule run in float64 on float64 copies of the parameters, its slots
replaced after every step by what the format stores (read back from codes and scales computed
from the definitions in float64, or stochastic rounding with the hash computed in Python
ints), its parameters rounded to float32 as the run keeps them. The compiled loop and the
per-tensor runner are compared byte for byte."""

import numpy as np
import pytest

import treeopt as optim
from tests.arrays import backend_params
from tests.registry import SETTINGS
from tests.test_precision import reference_bits, reference_int8
from treeopt import kernels
from treeopt.precision.formats import SIGNED_MEANINGS, UNSIGNED_MEANINGS

SHAPES = {"w": (48, 128), "small": (40, 40), "b": (128,)}  # w has int8 slots; the others stay float32


def _tree(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(count, seed=1):
    rng = np.random.default_rng(seed)
    return [
        {k: (rng.standard_normal(s) * np.exp(rng.uniform(-4, 1, s))).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(count)
    ]


def _stored(kind, value, path, slot, step, seed):
    """What the format keeps of ``value`` (float64), read back in float64."""
    if kind == "bfloat16":
        x = value.astype(np.float32)
        bits = np.array(reference_bits(seed, path, slot, step, x.size), np.uint64).reshape(x.shape)
        rounded = ((x.view(np.uint32).astype(np.uint64) + bits) & 0xFFFF0000).astype(np.uint32).view(np.float32)
        return np.where(np.isnan(x), x, rounded).astype(np.float64)
    if kind in ("int8", "uint8"):
        return reference_int8(value.astype(np.float32), kind == "int8", 256)[2]
    return value.astype(np.float32).astype(np.float64)


def _kind(state_dtype, meaning, shape):
    if state_dtype == "bfloat16":
        return "bfloat16"
    if state_dtype == "int8" and len(shape) >= 2 and np.prod(shape) >= 4096:
        return "int8" if meaning in SIGNED_MEANINGS else "uint8" if meaning in UNSIGNED_MEANINGS else "float32"
    return "float32"


def reference(setting, state_dtype, steps, seed=0):
    """Parameters and read-back slots after ``steps`` steps, from the float64 reference."""
    params = {k: v.astype(np.float64) for k, v in _tree(0).items()}
    opt = setting.make()  # slots in the parameters' dtype: float64
    meanings = opt.rule.slot_meanings or {}
    opt.init(params)
    for path in SHAPES:  # a slot that starts as the parameter starts as its nearest stored value
        for slot in opt.rule.copies_param:
            value = opt.state[path][slot]
            if state_dtype == "bfloat16":
                import ml_dtypes

                value[...] = value.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    for t, grads in enumerate(_grads(steps), start=1):
        opt.update(params, {k: v.astype(np.float64) for k, v in grads.items()})
        for path in SHAPES:
            params[path][...] = params[path].astype(np.float32)
            for slot, value in opt.state[path].items():
                kind = _kind(state_dtype, meanings.get(slot), value.shape)
                value[...] = _stored(kind, value, path, slot, t, seed)
    return params, opt.state


def run(setting, state_dtype, steps, backend="numpy", fast=True):
    from tests.arrays import as_float64, make

    tree = {k: make(v, backend) for k, v in _tree(0).items()}
    opt = setting.make(state_dtype=state_dtype)
    enabled = kernels.enabled
    kernels.enabled = fast
    try:
        for grads in _grads(steps):
            g = {k: make(v, backend) for k, v in grads.items()}
            if backend in ("numpy", "torch"):
                opt.update(tree, g)
            else:
                tree = opt.apply_gradients(g, tree)
    finally:
        kernels.enabled = enabled
    return {k: as_float64(v) for k, v in tree.items()}, opt


def read_back(opt, path):
    """The slots of ``path`` as float64 NumPy arrays, read back from their stored form."""
    from treeopt.backends import backend_of

    slots = opt.state[path]
    layout = opt.store.layout(SHAPES[path], "float32", (path,))
    if layout is None:  # float32 slots of float32 parameters
        return {name: np.asarray(value, np.float64) for name, value in slots.items()}
    out = {}
    for name, form in layout.forms.items():
        backend = backend_of(slots[name])
        host = {k: backend.to_numpy(v) for k, v in slots.items()}
        out[name] = form.load(optim.backends.numpy_backend, host, name, "float64")
    return out


def _compare(setting, state_dtype, got_params, opt, steps):
    ref_params, ref_state = reference(setting, state_dtype, steps)
    for path in SHAPES:
        scale = max(1.0, float(np.max(np.abs(ref_params[path]))))
        np.testing.assert_allclose(got_params[path], ref_params[path], rtol=2e-4, atol=2e-5 * scale, err_msg=path)
        for name, value in read_back(opt, path).items():
            expected = ref_state[path][name]
            top = float(np.max(np.abs(expected))) or 1.0
            # a code may differ by one step where float32 and float64 disagree on a tie; stochastic
            # rounding where the float32 value is one ulp from a rounding threshold
            close = np.isclose(value, expected, rtol=2e-4, atol=1e-6 * top)
            assert np.mean(close) > 0.99, (path, name, np.mean(close))
            np.testing.assert_allclose(value, expected, rtol=0.05, atol=0.02 * top, err_msg=f"{path}/{name}")


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8", "float32"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.id)
def test_every_optimizer_against_the_float64_reference(setting, state_dtype):
    params, opt = run(setting, state_dtype, 3, fast=False)
    _compare(setting, state_dtype, params, opt, 3)


ELEMENTWISE = [s for s in SETTINGS if s.capabilities.elementwise]


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("setting", ELEMENTWISE, ids=lambda s: s.id)
def test_the_compiled_loop_is_the_runner_byte_for_byte(setting, state_dtype):
    pytest.importorskip("numba")
    slow_params, slow = run(setting, state_dtype, 4, fast=False)
    fast_params, fast = run(setting, state_dtype, 4, fast=True)
    assert fast._compiled is not None and any(type(b).__name__ == "_StoredBucket" for b in fast._compiled.buckets)
    for path in SHAPES:
        np.testing.assert_array_equal(fast_params[path], slow_params[path])
        for key, value in slow.state[path].items():
            np.testing.assert_array_equal(
                np.asarray(fast.state[path][key]).view(np.uint8), np.asarray(value).view(np.uint8)
            )


def test_the_compiled_loop_is_the_runner_byte_for_byte_on_torch_tensors_and_non_finite_gradients():
    """A NaN in one block and an infinity in another: each block's scale is NaN and its codes 0
    (bfloat16 slots keep a NaN), in the loop as in the runner; torch CPU tensors run the loop."""
    pytest.importorskip("numba")
    pytest.importorskip("torch")
    import torch

    setting = next(s for s in SETTINGS if s.id == "AdamW(weight_decay=0.1,bias_correction=True)")
    for state_dtype in ("int8", "bfloat16"):
        results = []
        for fast in (False, True):
            params = {k: torch.from_numpy(v) for k, v in _tree(0).items()}
            opt = setting.make(state_dtype=state_dtype)
            enabled, kernels.enabled = kernels.enabled, fast
            try:
                for t, grads in enumerate(_grads(3)):
                    if t == 2:
                        grads["w"][3, 7], grads["w"][10, 200 % 128] = np.nan, np.inf
                    opt.update(params, {k: torch.from_numpy(v) for k, v in grads.items()})
            finally:
                kernels.enabled = enabled
            results.append((params, opt))
            if fast:
                assert any(type(b).__name__ == "_StoredBucket" for b in opt._compiled.buckets)
        (slow_params, slow), (fast_params, fast_opt) = results
        if state_dtype == "int8":
            scale = slow.state["w"]["m_scale"].numpy()
            assert np.isnan(scale[3, 0]) and np.isnan(scale[10, 0]) and not np.isnan(scale[0, 0])
            assert (slow.state["w"]["m"][3, :256].numpy() == 0).all()
        for path in SHAPES:
            np.testing.assert_array_equal(fast_params[path].numpy(), slow_params[path].numpy())
            for key, value in slow.state[path].items():
                got = fast_opt.state[path][key]
                if value.is_floating_point():  # a NaN is a NaN: its sign and payload are the library's
                    nan = torch.isnan(value.float())
                    assert torch.equal(nan, torch.isnan(got.float())), (path, key)
                    value, got = value[~nan], got[~nan]
                np.testing.assert_array_equal(got.view(torch.uint8).numpy(), value.view(torch.uint8).numpy())


@pytest.mark.parametrize("offset", [0, 2**31 - 100, 2**32 - 100, 5 * 2**32 + 7])
def test_the_compiled_loop_draws_the_bits_of_the_whole_tensor_index(offset):
    """A shard's elements draw the random bits of their index in the whole tensor, modulo 2^32
    (the loop counts it in 32 bits): the bytes of the formats' array code at that offset,
    across 2^31 and 2^32."""
    pytest.importorskip("numba")
    from treeopt.backends import numpy_backend
    from treeopt.kernels.numba_precision import block_items, block_of, kernel_for
    from treeopt.precision.formats import Bfloat16, Noise
    from treeopt.rules.adam import ADAMW, adamw_coefficients

    rng = np.random.default_rng(3)
    shape, kinds = (3, 300), ("bf16", "bf16")
    g, p = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    m = Bfloat16().encode(numpy_backend, "m", rng.standard_normal(shape).astype(np.float32), None)["m"]
    v = Bfloat16().encode(numpy_backend, "v", rng.random(shape).astype(np.float32), None)["v"]
    values = adamw_coefficients(1e-2, 3, betas=(0.9, 0.99), eps=1e-8, bias_correction=True, weight_decay=0.1)
    values = {k: np.float32(x) for k, x in values.items()}
    noise = Noise(11, "blocks.0.w", 3, offset)
    # the per-tensor runner's numbers: the rule on the slots read back, stored with the noise
    want_p, want_m, want_v = ADAMW.update(g, p, m.astype(np.float32), v.astype(np.float32), **values)
    want = {k: Bfloat16().encode(numpy_backend, k, x, noise)[k] for k, x in (("m", want_m), ("v", want_v))}

    kernel, numeric = kernel_for(ADAMW, kinds)
    pieces, items, columns, per_row = block_items([shape], False, threads=1, block=block_of(kinds))
    pointers = lambda *arrays: np.array([[a.ctypes.data for a in arrays]], np.int64)  # noqa: E731
    salts = np.array([[noise.salt(numpy_backend, "m"), noise.salt(numpy_backend, "v")]], np.int64)
    kernel(pointers(g)[0], pointers(p)[0], pointers(m, v), np.zeros((1, 2), np.int64), pieces, items, columns,
           per_row, np.zeros(1, np.int64), np.array([[values[n] for n in numeric]], np.float32),
           np.zeros(0, np.bool_), salts, np.array([offset], np.int64))  # fmt: skip
    np.testing.assert_array_equal(p, want_p)
    np.testing.assert_array_equal(m.view(np.uint16), want["m"].view(np.uint16))
    np.testing.assert_array_equal(v.view(np.uint16), want["v"].view(np.uint16))


CROSS = [
    s
    for s in SETTINGS
    if s.id in ("AdamW(weight_decay=0.1,bias_correction=True)", "Muon()", "Lion()", "SGD(momentum=0.9)")
]


@pytest.mark.parametrize("backend", backend_params(["torch", "jax", "mlx"]))
@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("setting", CROSS, ids=lambda s: s.id)
def test_every_backend_against_the_float64_reference(setting, state_dtype, backend):
    params, opt = run(setting, state_dtype, 3, backend=backend)
    _compare(setting, state_dtype, params, opt, 3)


def test_jax_jitted_step_stores_the_compact_state():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import treeopt.jax as tj

    setting = next(s for s in SETTINGS if s.id == "AdamW(weight_decay=0.1,bias_correction=True)")
    opt = setting.make(state_dtype="int8")
    params = {k: jnp.asarray(v) for k, v in _tree(0).items()}
    state = tj.init(opt, params)
    assert state["w"]["m"].dtype == jnp.int8 and state["w"]["v"].dtype == jnp.uint8
    step = jax.jit(lambda g, s, p: tj.update(opt, g, s, p))
    for grads in _grads(3):
        params, state = step({k: jnp.asarray(v) for k, v in grads.items()}, state, params)
    ref_params, _ = reference(setting, "int8", 3)
    for path in SHAPES:
        np.testing.assert_allclose(np.asarray(params[path]), ref_params[path], rtol=2e-4, atol=2e-5)
