"""The arithmetic of the compact state formats, written once for arrays and for scalars.

Every function here uses only arithmetic operators and ``sqrt``, ``floor`` and ``sign`` of
:mod:`treeopt.ops`, so the same source runs on NumPy, torch, JAX and MLX arrays and, rebound
to scalar functions and compiled by numba, inside the fused loop of
:mod:`treeopt.kernels.numba_precision`.
Constants come in as arguments in the value's dtype: a Python float literal would promote a
float32 scalar to float64 inside numba, and the codes must be the same on every runner.

**int8 codes.** A block of values ``x`` (at most ``BLOCK`` consecutive elements of one row
of the tensor) is stored as one float32 scale ``s = max |x|`` and one byte per element:

- signed (first moments, momentum buffers): ``q = sign(x) * floor(127 * sqrt(|x| / s) + 1/2)``
  in [-127, 127], read back as ``x' = q * |q| * (s * (1/127^2))``;
- unsigned (second moments and other non-negative averages): ``q = floor(255 * (x / s)^(1/4)
  + 1/2)`` in [0, 255], read back as ``x' = (q^2)^2 * (s * (1/255^4))``
  (each product rounded to float32, in this order).

The square (fourth power) gives small values of the block finer steps than a linear code
would: ``sqrt(x')`` of a second moment, which is what Adam divides by, has the same relative
precision as a first moment. With ``t = sqrt(|x| / s)`` (signed) or ``t = (x / s)^(1/4)``
(unsigned), rounding moves ``t`` by at most ``1/254`` (``1/510``), so, up to float32 rounding,

- signed:   ``|x' - x| <= s * (2t + 1/254) / 254``  (0.79% of ``s`` at the top, ``s/64516`` at 0)
- unsigned: ``|x' - x| <= s * 4 (t + 1/510)^3 / 510`` (0.78% of ``s`` at the top)

and a value below ``s / 64516`` (signed) or ``s / 510^4`` (unsigned) reads back as 0. The
code is deterministic (round half up on ``|x|``): a state and a gradient give the same bytes
on every backend, runner and rank. A block holding a NaN or an infinity gets a NaN scale, so
the whole block reads back as NaN (as a float32 state would hold the NaN in that element).

**bfloat16 with stochastic rounding.** A float32 value ``x`` is rounded to one of the two
bfloat16 values around it, up with probability equal to its distance from the lower one
(unbiased: ``E[x'] = x``), by adding 16 random bits to its bit pattern and dropping the low
16 bits. The random bits are a counter-based hash, not a generator with a state:
``bits(i) = mix32(salt ^ i) >> 16`` for element ``i`` of the flattened tensor, with
``salt = mix32(mix32(mix32(seed) + key) + step)``, ``key`` a hash of the parameter's path and
slot and ``step`` the optimizer's step; ``mix32`` is Chris Wellons' ``lowbias32`` integer
hash (two multiplications, three shift-xors). So a run reproduces from its seed, every rank
and every shard of a parameter draws the same bits for the same element, and the draw costs
a few integer operations per element inside the loop.
"""

from __future__ import annotations

import zlib
from typing import Any

from treeopt.ops import floor, sign, sqrt

#: elements per int8 block (at most: a row shorter than this, or its last piece, is a block)
BLOCK = 256
#: tensors with fewer elements, or fewer than two axes, keep an int8 format's slots in float32
MIN_SIZE = 4096
SIGNED_LEVELS, UNSIGNED_LEVELS = 127, 255
#: a block's read-back step is its scale times these (rounded to float32 where they are used)
SIGNED_UNIT, UNSIGNED_UNIT = 1.0 / SIGNED_LEVELS**2, 1.0 / UNSIGNED_LEVELS**4

MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------- int8 codes
def signed_code(x: Any, inverse_scale: Any, levels: Any, half: Any) -> Any:
    """The signed code of ``x`` (a float holding an integer in [-127, 127])."""
    return sign(x) * floor(sqrt(abs(x) * inverse_scale) * levels + half)


def signed_value(code: Any, step: Any) -> Any:
    """A signed code read back: ``step = scale * (1 / 127^2)`` of its block."""
    return code * abs(code) * step


def unsigned_code(x: Any, inverse_scale: Any, levels: Any, half: Any) -> Any:
    """The unsigned code of ``x >= 0`` (a float holding an integer in [0, 255])."""
    return floor(sqrt(sqrt(x * inverse_scale)) * levels + half)


def unsigned_value(code: Any, step: Any) -> Any:
    """An unsigned code read back: ``step = scale * (1 / 255^4)`` of its block."""
    square = code * code
    return square * square * step


# ---------------------------------------------------------------------- random bits
#: the multipliers of :func:`mix32` and the 32-bit mask, as Python ints
MIX_CONSTANTS = (0x7FEB352D, 0x846CA68B, MASK32)


def mix32(x: Any, constants: tuple[Any, Any, Any] = MIX_CONSTANTS) -> Any:
    """Chris Wellons' ``lowbias32``: a bijection of 32-bit integers whose output bits each
    depend on every input bit. ``x`` is a Python int, or an integer array (uint32, or a wider
    integer holding 32-bit values); ``constants`` are :data:`MIX_CONSTANTS` in ``x``'s type
    where the library does not take large Python ints (JAX)."""
    first, second, mask = constants
    x = x ^ (x >> 16)
    x = (x * first) & mask
    x = x ^ (x >> 15)
    x = (x * second) & mask
    return x ^ (x >> 16)


def salt(seed: int, key: int, step: int) -> int:
    """The per-tensor, per-step part of the random bits (a Python int below 2^32)."""
    return mix32((mix32((mix32(seed & MASK32) + key) & MASK32) + step) & MASK32)


def path_key(path: str, slot: str) -> int:
    """The key of a parameter's slot in the random stream: a stable 32-bit hash of its names
    (CRC-32), the same in every process."""
    return zlib.crc32(f"{path}/{slot}".encode())
