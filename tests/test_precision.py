"""The stored state formats (treeopt.precision) against references written from their
definitions: int8 block codes against a float64 computation of the same formulas, the
documented error bounds, stochastic rounding against the hash computed with Python ints, and
every backend byte for byte against NumPy's."""

import math

import numpy as np
import pytest

from tests.arrays import backend_params
from treeopt.backends import get_backend, numpy_backend
from treeopt.precision import codes
from treeopt.precision.formats import Bfloat16, Int8, Noise, StatePrecision, layout, random_bits, state_precision

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------- references
def reference_int8(x, signed, block):
    """(codes, scales, float64 read-back, real-valued code before rounding) from the
    definitions in float64."""
    x = np.asarray(x, np.float64)
    rows = x.shape[0]
    columns = math.prod(x.shape[1:])
    per_row = -(-columns // block)
    flat = x.reshape(rows, columns)
    out = np.zeros_like(flat)
    raw = np.zeros_like(flat)
    scales = np.zeros((rows, per_row))
    levels = 127 if signed else 255
    for r in range(rows):
        for b in range(per_row):
            piece = flat[r, b * block : (b + 1) * block]
            s = np.max(np.abs(piece))
            if not np.isfinite(s):
                scales[r, b] = np.nan
                continue
            scales[r, b] = s
            if s == 0:
                continue
            t = np.sqrt(np.abs(piece) / s) if signed else (piece / s) ** 0.25
            raw[r, b * block : b * block + len(piece)] = levels * t + 0.5
            q = np.floor(levels * t + 0.5)
            out[r, b * block : b * block + len(piece)] = np.sign(piece) * q if signed else q
    read = np.zeros_like(flat)
    for r in range(rows):
        for b in range(per_row):
            q = out[r, b * block : (b + 1) * block]
            s = scales[r, b]
            read[r, b * block : (b + 1) * block] = s * q * np.abs(q) / 127**2 if signed else s * (q / 255) ** 4
    return out.reshape(x.shape), scales, read.reshape(x.shape), raw.reshape(x.shape)


def reference_bits(seed, path, slot, step, count):
    """The random bits of stochastic rounding, from the hash's definition, with Python ints."""

    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    import zlib

    key = zlib.crc32(f"{path}/{slot}".encode())
    salt = mix((mix((mix(seed) + key) % 2**32) + step) % 2**32)
    return [mix(salt ^ i) >> 16 for i in range(count)]


def moments(shape, heavy=False):
    """A first and a second moment as an optimizer makes them: wide ranges within a row."""
    g = RNG.standard_normal(shape).astype(np.float32)
    if heavy:
        g *= np.exp(RNG.uniform(-9, 2, shape)).astype(np.float32)
    return g, (g * g).astype(np.float32)


# ---------------------------------------------------------------------- int8
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(64, 300), (7, 256), (33, 5, 40), (3, 1000)])
def test_int8_codes_match_the_float64_definition(signed, shape):
    m, v = moments(shape, heavy=True)
    x = m if signed else v
    form = Int8(signed)
    stored = form.encode(numpy_backend, "s", x, None)
    expected, scales, read, raw = reference_int8(x, signed, codes.BLOCK)
    assert stored["s"].dtype == (np.int8 if signed else np.uint8)
    assert stored["s_scale"].dtype == np.float32 and stored["s_scale"].shape == scales.shape
    np.testing.assert_array_equal(stored["s_scale"], scales.astype(np.float32))  # a maximum is exact
    differ = stored["s"].astype(np.float64) != expected
    # float32 arithmetic may only disagree with float64 on values within its rounding of a tie
    near_tie = np.abs(raw - np.round(raw)) < 1e-4
    assert not np.any(differ & ~near_tie)
    assert np.all(np.abs(stored["s"].astype(np.float64) - expected)[differ] == 1)
    back = form.load(numpy_backend, stored, "s", "float32")
    same = ~differ
    np.testing.assert_allclose(back[same], read[same], rtol=3e-7, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_int8_error_within_the_documented_bound(signed):
    m, v = moments((128, 1024), heavy=True)
    x = (m if signed else v).astype(np.float64)
    form = Int8(signed)
    back = form.load(numpy_backend, form.encode(numpy_backend, "s", x.astype(np.float32), None), "s", "float64")
    x = x.astype(np.float32).astype(np.float64)
    blocks = np.abs(x).reshape(128, 4, 256).max(-1)
    s = np.repeat(blocks, 256, axis=1)
    if signed:
        t = np.sqrt(np.abs(x) / s)
        bound = s * (2 * t + 1 / 254) / 254
    else:
        t = (x / s) ** 0.25
        bound = s * 4 * (t + 1 / 510) ** 3 / 510
    error = np.abs(back - x)
    assert np.all(error <= bound * (1 + 1e-5) + s * 1e-7)
    # the bound is tight: some elements come close to it
    assert np.max(error / bound) > 0.5


def test_int8_blocks_follow_rows_and_zero_and_nonfinite_blocks():
    x = np.zeros((3, 300), np.float32)
    x[0, 5] = 2.0
    x[1, 260] = np.nan  # second block of row 1
    x[2, 3] = np.inf
    form = Int8(True)
    stored = form.encode(numpy_backend, "m", x, None)
    scale = stored["m_scale"]
    assert scale.shape == (3, 2)
    assert scale[0, 0] == 2.0 and scale[0, 1] == 0.0 and scale[1, 0] == 0.0
    assert np.isnan(scale[1, 1]) and np.isnan(scale[2, 0])
    assert stored["m"][0, 5] == 127 and np.all(stored["m"][1] == 0)
    back = form.load(numpy_backend, stored, "m", "float32")
    assert back[0, 5] == pytest.approx(2.0) and np.all(back[0, 6:] == 0)
    assert np.all(np.isnan(back[1, 256:])) and np.all(back[1, :256] == 0)  # NaN spreads over its block only
    assert np.all(np.isnan(back[2, :256]))


@pytest.mark.parametrize("backend_name", backend_params(["torch", "jax", "mlx"]))
@pytest.mark.parametrize("signed", [True, False])
def test_int8_identical_on_every_backend(backend_name, signed):
    backend = get_backend(backend_name)
    m, v = moments((40, 700), heavy=True)
    x = m if signed else v
    form = Int8(signed)
    expected = form.encode(numpy_backend, "s", x, None)
    got = form.encode(backend, "s", backend.from_numpy(x), None)
    for key in expected:
        np.testing.assert_array_equal(backend.to_numpy(got[key]), expected[key])
    back = form.load(backend, got, "s", "float32")
    np.testing.assert_array_equal(backend.to_numpy(back), form.load(numpy_backend, expected, "s", "float32"))


# ---------------------------------------------------------------------- bfloat16
def test_stochastic_rounding_bits_match_the_hash_definition():
    noise = Noise(seed=7, path="layers.0.weight", step=12)
    bits = random_bits(numpy_backend, 50, noise.salt(numpy_backend, "m"), 0, np.zeros(1, np.float32))
    assert list(bits) == reference_bits(7, "layers.0.weight", "m", 12, 50)


def test_stochastic_rounding_rounds_to_a_neighbour_unbiased():
    import ml_dtypes

    x = RNG.standard_normal(20000).astype(np.float32)
    form = Bfloat16()
    draws = [
        form.encode(numpy_backend, "m", x, Noise(0, "w", step))["m"].astype(np.float32).astype(np.float64)
        for step in range(1, 65)
    ]
    down = x.astype(ml_dtypes.bfloat16).astype(np.float32)  # nearest, then the other neighbour
    lower = np.where(down <= x, down, np.nextafter(down.astype(ml_dtypes.bfloat16), -np.inf).astype(np.float32))
    bits = x.view(np.uint32) & 0xFFFF0000
    lower = np.where(x >= 0, bits.view(np.float32), lower)
    for d in draws[:3]:
        upper_ok = np.abs(d) >= np.abs(bits.view(np.float32))
        assert np.all(upper_ok)
    mean = np.mean(draws, axis=0)
    ulp = np.abs(x) * 2.0**-7
    # the mean of 64 draws is within 4 standard errors of x for (almost) every element
    assert np.mean(np.abs(mean - x) <= 4 * ulp / np.sqrt(64) + 1e-30) > 0.999
    # bit exact: the expected rounding from the bits
    expected_bits = reference_bits(0, "w", "m", 1, 20000)
    expected = ((x.view(np.uint32).astype(np.uint64) + np.array(expected_bits, np.uint64)) & 0xFFFF0000).astype(
        np.uint32
    )
    np.testing.assert_array_equal(draws[0].astype(np.float32).view(np.uint32), expected)


@pytest.mark.parametrize("backend_name", backend_params(["torch", "jax", "mlx"]))
def test_stochastic_rounding_identical_on_every_backend(backend_name):
    backend = get_backend(backend_name)
    x = RNG.standard_normal((30, 77)).astype(np.float32)
    x[0, 0] = np.nan
    x[0, 1] = np.inf
    noise = Noise(3, "blocks.1.w", 5)
    expected = Bfloat16().encode(numpy_backend, "v", x, noise)["v"]
    got = Bfloat16().encode(backend, "v", backend.from_numpy(x), noise)["v"]
    assert backend.dtype_name(got) == "bfloat16"
    got = np.array(backend.to_numpy(got))
    assert np.isnan(got.astype(np.float32)[0, 0]) and np.isnan(expected.astype(np.float32)[0, 0])
    got[0, 0] = expected[0, 0] = 0  # a NaN's payload is the library's
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))
    assert np.isinf(expected.astype(np.float32)[0, 1])


def test_stochastic_rounding_with_a_traced_step_is_the_same():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    backend = get_backend("jax")
    x = RNG.standard_normal(500).astype(np.float32)
    expected = Bfloat16().encode(numpy_backend, "m", x, Noise(1, "w", 9))["m"]

    @jax.jit
    def encode(x, step):
        return Bfloat16().encode(backend, "m", x, Noise(1, "w", step))["m"]

    got = encode(jnp.asarray(x), jnp.asarray(9, jnp.uint32))
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), expected.view(np.uint16))


# ---------------------------------------------------------------------- layouts and the setting
def test_layout_per_slot():
    meanings = {"m": "average of gradients", "v": "average of squared gradients"}
    int8 = StatePrecision("int8")
    big = layout(int8, "float32", {"m": (64, 128), "v": (64, 128)}, meanings)
    assert [f.name for f in big.forms.values()] == ["int8/256", "uint8/256"] and big.compute == "float32"
    assert big.entries({"m": (64, 128), "v": (64, 128)}) == {
        "m": ((64, 128), "int8"),
        "m_scale": ((64, 1), "float32"),
        "v": ((64, 128), "uint8"),
        "v_scale": ((64, 1), "float32"),
    }
    small = layout(int8, "float32", {"m": (64,), "v": (64,)}, meanings)
    assert [f.name for f in small.forms.values()] == ["float32", "float32"]
    other = layout(int8, "bfloat16", {"z": (64, 128)}, {"z": "schedule-free base sequence"})
    assert other.forms["z"].name == "float32" and other.compute == "float32"
    assert layout(StatePrecision("float32"), "float32", {"m": (3, 3)}, meanings) is None
    assert layout(None, "bfloat16", {"m": (3, 3)}, meanings) is None
    assert layout(StatePrecision("bfloat16"), "float64", {"m": (3,)}, meanings).compute == "float64"


def test_state_dtype_is_checked():
    assert state_precision(None, "AdamW") is None
    assert state_precision("int8", "AdamW") == StatePrecision("int8")
    with pytest.raises(ValueError, match=r"AdamW state_dtype should be None or one of .*'int4' was provided"):
        state_precision("int4", "AdamW")
    with pytest.raises(TypeError, match="AdamW state_dtype should be None, a string or a StatePrecision"):
        state_precision(8, "AdamW")
    with pytest.raises(ValueError, match="seed"):
        StatePrecision("bfloat16", seed=-1)
    with pytest.raises(ValueError, match="block"):
        StatePrecision("int8", block=0)
