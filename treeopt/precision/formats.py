"""How each slot of an optimizer's state is stored, read for the rule, and written back.

An optimizer's ``state_dtype`` (a :class:`StatePrecision`) decides, for each parameter, a
:class:`Layout`: the dtype the rule computes in, and one :class:`Form` per slot. A form says
which arrays the slot keeps in the state dict (its *entries*), how they are read into an array
of the compute dtype (``load``) and how a result of the rule is written back (``encode``).
The rule never sees a stored form: runners load, call the rule, and encode around it.

- :class:`Plain`: the slot in a float dtype (``"float32"``), rounded to nearest.
- :class:`Bfloat16`: bfloat16 with seeded stochastic rounding (see :mod:`.codes`).
- :class:`Int8`: one byte per element (signed or unsigned code) plus one float32 scale per
  block of at most :data:`~.codes.BLOCK` elements of a row (entry ``"<slot>_scale"`` of shape
  ``(rows, blocks per row)``): a tensor split by rows across ranks splits its blocks whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from treeopt.backends import Backend
from treeopt.precision import codes
from treeopt.types import Array, Shape

__all__ = [
    "STATE_DTYPES",
    "StatePrecision",
    "Form",
    "Plain",
    "Bfloat16",
    "Int8",
    "Layout",
    "Noise",
    "state_precision",
    "layout",
    "block_grid",
]

#: the names ``state_dtype=`` takes (besides ``None``, the parameter's own dtype)
STATE_DTYPES = ("float32", "bfloat16", "int8")

#: slot meanings (:attr:`treeopt.rules.base.Rule.slot_meanings`) an int8 state stores with the
#: signed code, and with the unsigned one; a slot of any other meaning (schedule-free's base
#: sequence, Adan's previous gradient) stays in float32
SIGNED_MEANINGS = frozenset(
    {"average of gradients", "momentum buffer", "average of updates", "average of gradient differences"}
)
UNSIGNED_MEANINGS = frozenset(
    {
        "average of squared gradients",
        "sum of squared gradients",
        "infinity norm of gradients",
        "average of squared updates",
        "average of squared Nesterov gradients",
    }
)


@dataclass(frozen=True)
class StatePrecision:
    """How an optimizer stores its slots: ``state_dtype=`` of every built-in optimizer.

    Args:
        dtype: ``"float32"``, ``"bfloat16"`` (computed in float32, written back with seeded
            stochastic rounding) or ``"int8"`` (block-wise codes with a float32 scale per
            block; small tensors and slots that are not moments stay in float32).
        seed: the seed of bfloat16's stochastic rounding.
        block: elements per int8 block (at most; a row is cut into blocks of this size).
        min_size: tensors with fewer elements (or fewer than two axes) keep int8 slots in float32.
    """

    dtype: str
    seed: int = 0
    block: int = codes.BLOCK
    min_size: int = codes.MIN_SIZE

    def __post_init__(self) -> None:
        if self.dtype not in STATE_DTYPES:
            raise ValueError(
                f"state_dtype should be None or one of {STATE_DTYPES}, {self.dtype!r} was provided instead"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"StatePrecision seed should be an integer in [0, 2**32), {self.seed!r} was provided")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or not 1 <= self.block <= 1 << 16:
            raise ValueError(f"StatePrecision block should be an integer in [1, 65536], {self.block!r} was provided")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
            raise ValueError(f"StatePrecision min_size should be an integer >= 0, {self.min_size!r} was provided")

    def describe(self) -> str:
        if self.dtype == "int8":
            return f"int8/{self.block}"
        return self.dtype


def state_precision(value: str | StatePrecision | None, owner: str) -> StatePrecision | None:
    """``state_dtype=`` checked: ``None``, a name of :data:`STATE_DTYPES` or a :class:`StatePrecision`."""
    if value is None or isinstance(value, StatePrecision):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{owner} state_dtype should be None, a string or a StatePrecision, got {type(value).__name__}")
    if value not in STATE_DTYPES:
        raise ValueError(f"{owner} state_dtype should be None or one of {STATE_DTYPES}, {value!r} was provided instead")
    return StatePrecision(value)


@dataclass(frozen=True)
class Noise:
    """Where the random bits of one slot's stochastic rounding come from: the seed, the
    parameter's path and the step (a Python int, or a 0-d integer array under ``jax.jit``),
    and the first element's index in the whole tensor (a shard's offset)."""

    seed: int
    path: str
    step: Any
    offset: int = 0
    #: the per-tensor part of each slot's salt, when computed beforehand (a compiled step)
    starts: dict[str, int] | None = None

    def start(self, slot: str) -> int:
        """The part of ``slot``'s salt that does not change from step to step."""
        if self.starts is not None:
            return self.starts[slot]
        return codes.mix32((codes.mix32(self.seed) + codes.path_key(self.path, slot)) & codes.MASK32)

    def salt(self, backend: Backend, slot: str) -> Any:
        start = self.start(slot)
        if isinstance(self.step, int):
            return codes.mix32((start + self.step) & codes.MASK32)
        constants = tuple(backend.hash_scalar(c) for c in codes.MIX_CONSTANTS)
        step = backend.astype(self.step, backend.hash_dtype)
        return codes.mix32((step + backend.hash_scalar(start)) & constants[2], constants)


def random_bits(backend: Backend, count: int, salt: Any, offset: int, like: Array) -> Array:
    """16 random bits for each of ``count`` elements (indices ``offset, offset + 1, ...``)."""
    constants = tuple(backend.hash_scalar(c) for c in codes.MIX_CONSTANTS)
    index = backend.arange_of(count, backend.hash_dtype, like)
    if offset:
        index = index + backend.hash_scalar(offset & codes.MASK32)
    if isinstance(salt, int):
        salt = backend.hash_scalar(salt)
    return codes.mix32(index ^ salt, constants) >> 16


# ---------------------------------------------------------------------- forms
class Form:
    """How one slot is stored."""

    #: the name shown in plans
    name: str = "?"

    def entries(self, slot: str, shape: Shape) -> dict[str, tuple[Shape, str]]:
        """The state entries of the slot: ``{key: (shape, dtype)}``."""
        raise NotImplementedError

    def zeros(self, backend: Backend, slot: str, shape: Shape, like: Array) -> dict[str, Array]:
        return {key: backend.zeros_of(s, dtype, like) for key, (s, dtype) in self.entries(slot, shape).items()}

    def load(self, backend: Backend, slots: dict[str, Array], slot: str, dtype: str) -> Array:
        """The slot as an array of ``dtype`` for the rule."""
        raise NotImplementedError

    def encode(self, backend: Backend, slot: str, value: Array, noise: Noise | None) -> dict[str, Array]:
        """The entries that store ``value`` (an array of the compute dtype)."""
        raise NotImplementedError

    def nbytes(self, slot: str, shape: Shape) -> int:
        return sum(math.prod(s) * _ITEMSIZE[dtype] for s, dtype in self.entries(slot, shape).values())


_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class Plain(Form):
    """The slot in a float dtype, rounded to nearest."""

    dtype: str

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.dtype

    def entries(self, slot: str, shape: Shape) -> dict[str, tuple[Shape, str]]:
        return {slot: (shape, self.dtype)}

    def load(self, backend: Backend, slots: dict[str, Array], slot: str, dtype: str) -> Array:
        value = slots[slot]
        return value if backend.dtype_name(value) == dtype else backend.astype(value, dtype)

    def encode(self, backend: Backend, slot: str, value: Array, noise: Noise | None) -> dict[str, Array]:
        return {slot: value if backend.dtype_name(value) == self.dtype else backend.astype(value, self.dtype)}


@dataclass(frozen=True)
class Bfloat16(Form):
    """bfloat16, written back with stochastic rounding."""

    name = "bfloat16"

    def entries(self, slot: str, shape: Shape) -> dict[str, tuple[Shape, str]]:
        return {slot: (shape, "bfloat16")}

    def load(self, backend: Backend, slots: dict[str, Array], slot: str, dtype: str) -> Array:
        return backend.astype(slots[slot], dtype)

    def encode(self, backend: Backend, slot: str, value: Array, noise: Noise | None) -> dict[str, Array]:
        if noise is None:  # no step to draw from (a state built outside a step): nearest
            return {slot: backend.astype(value, "bfloat16")}
        if backend.dtype_name(value) != "float32":
            value = backend.astype(value, "float32")  # float64 rounds to float32 first
        shape = tuple(backend.shape(value))
        flat = value.reshape(-1)
        bits = random_bits(backend, math.prod(shape), noise.salt(backend, slot), noise.offset, flat)
        return {slot: backend.round_bfloat16(flat, bits).reshape(shape)}


def block_grid(shape: Sequence[int], block: int) -> tuple[int, int, int]:
    """``(rows, columns, blocks per row)`` of a tensor of ``shape`` cut into int8 blocks."""
    rows = shape[0] if shape else 1
    columns = math.prod(shape[1:]) if len(shape) > 1 else 1
    return rows, columns, -(-columns // block)


@dataclass(frozen=True)
class Int8(Form):
    """One byte per element and a float32 scale per block (see :mod:`.codes`)."""

    signed: bool
    block: int = codes.BLOCK

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"int8/{self.block}" if self.signed else f"uint8/{self.block}"

    @property
    def levels(self) -> int:
        return codes.SIGNED_LEVELS if self.signed else codes.UNSIGNED_LEVELS

    @property
    def unit(self) -> float:
        """The read-back step of a block of scale 1: ``1/127^2`` or ``1/255^4`` (a block's step
        is ``scale * unit``, one float32 product: a division by a constant is not correctly
        rounded under XLA)."""
        return codes.SIGNED_UNIT if self.signed else codes.UNSIGNED_UNIT

    def entries(self, slot: str, shape: Shape) -> dict[str, tuple[Shape, str]]:
        rows, _, per_row = block_grid(shape, self.block)
        return {slot: (shape, "int8" if self.signed else "uint8"), f"{slot}_scale": ((rows, per_row), "float32")}

    def _blocks(self, backend: Backend, x: Array, shape: Shape) -> Array:
        """``x`` as ``(rows, blocks, block)``, zero-padded at the end of each row."""
        rows, columns, per_row = block_grid(shape, self.block)
        x = x.reshape(rows, columns)
        if per_row * self.block != columns:
            x = backend.pad_last(x, per_row * self.block - columns)
        return x.reshape(rows, per_row, self.block)

    def _unblock(self, x: Array, shape: Shape) -> Array:
        rows, columns, per_row = block_grid(shape, self.block)
        x = x.reshape(rows, per_row * self.block)
        if per_row * self.block != columns:
            x = x[:, :columns]
        return x.reshape(shape)

    def load(self, backend: Backend, slots: dict[str, Array], slot: str, dtype: str) -> Array:
        stored = slots[slot]
        shape = tuple(backend.shape(stored))
        scale = slots[f"{slot}_scale"]
        step = scale * backend.cast(self.unit, scale)
        code = self._blocks(backend, backend.astype(stored, "float32"), shape)
        step = step.reshape(tuple(backend.shape(step)) + (1,))
        read = codes.signed_value if self.signed else codes.unsigned_value
        value = self._unblock(read(code, step), shape)
        return value if dtype == "float32" else backend.astype(value, dtype)

    def encode(self, backend: Backend, slot: str, value: Array, noise: Noise | None) -> dict[str, Array]:
        if backend.dtype_name(value) != "float32":
            value = backend.astype(value, "float32")
        shape = tuple(backend.shape(value))
        x = self._blocks(backend, value, shape)
        with backend.quiet():
            scale = backend.max_last(abs(x))
            finite = scale * 0.0 == 0.0
            usable = finite & (scale > 0.0)
            inverse = backend.where(usable, 1.0 / backend.where(usable, scale, 1.0), 0.0)
            scale = backend.where(finite, scale, float("nan"))
            inverse = inverse.reshape(tuple(backend.shape(inverse)) + (1,))
            levels, half = backend.cast(float(self.levels), value), backend.cast(0.5, value)
            if self.signed:
                code = codes.signed_code(x, inverse, levels, half)
            else:
                code = codes.unsigned_code(x, inverse, levels, half)
            code = backend.where(code == code, code, 0.0)  # a NaN or infinite block: codes 0, scale NaN
        stored = backend.astype(self._unblock(code, shape), "int8" if self.signed else "uint8")
        return {slot: stored, f"{slot}_scale": scale}


# ---------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """How one parameter's slots are stored: the dtype the rule computes in and each slot's form."""

    compute: str
    forms: dict[str, Form]

    def entries(self, shapes: dict[str, Shape]) -> dict[str, tuple[Shape, str]]:
        """Every state entry of the parameter: ``{key: (shape, dtype)}``."""
        found: dict[str, tuple[Shape, str]] = {}
        for slot, shape in shapes.items():
            found.update(self.forms[slot].entries(slot, shape))
        return found


def layout(
    precision: StatePrecision | None,
    param_dtype: str,
    shapes: dict[str, Shape],
    meanings: dict[str, str] | None,
    whole: Shape | None = None,
    shape: Shape | None = None,
) -> Layout | None:
    """The layout of a parameter of dtype ``param_dtype`` whose slots have ``shapes``
    (meanings from the rule); ``None`` when the slots are stored as the parameter (the
    default: MLX's state, computed in the parameter's dtype). A parameter held in part (a
    shard of rows, ``shape``) is judged by its ``whole`` shape, so every rank stores its
    rows as one process stores the tensor."""
    if precision is None or precision.dtype == param_dtype:
        return None
    compute = "float64" if param_dtype == "float64" else "float32"
    forms: dict[str, Form] = {}
    for slot, slot_shape in shapes.items():
        size = math.prod(whole if whole is not None and tuple(slot_shape) == tuple(shape or ()) else slot_shape)
        if precision.dtype == "bfloat16":
            forms[slot] = Bfloat16()
        elif precision.dtype == "int8" and len(slot_shape) >= 2 and size >= max(1, precision.min_size):
            meaning = (meanings or {}).get(slot)
            if meaning in SIGNED_MEANINGS:
                forms[slot] = Int8(True, precision.block)
            elif meaning in UNSIGNED_MEANINGS:
                forms[slot] = Int8(False, precision.block)
            else:
                forms[slot] = Plain("float32")
        else:
            forms[slot] = Plain("float32")
    return Layout(compute, forms)


# ---------------------------------------------------------------------- stored slots read without a layout
def stored_form(entries: dict[str, tuple[Shape, str]], slot: str, block: int = codes.BLOCK) -> Form | str:
    """The form of ``slot`` from the entries a file or a state holds for it (``{key: (shape,
    dtype)}``), or a message saying why they cannot be a stored slot: a float array, or int8
    (signed) or uint8 (unsigned) codes with a float32 ``<slot>_scale`` of their block grid."""
    if slot not in entries:
        return f"has no entry {slot!r}"
    shape, dtype = entries[slot]
    scale = entries.get(f"{slot}_scale")
    if dtype in ("int8", "uint8"):
        if scale is None:
            return f"{slot!r} holds {dtype} codes but there is no {slot + '_scale'!r}"
        rows, _, per_row = block_grid(shape, block)
        if tuple(scale[0]) != (rows, per_row) or scale[1] != "float32":
            return (
                f"{slot + '_scale'!r} is {scale[1]}{list(scale[0])}; codes of shape {list(shape)} in blocks of "
                f"{block} need float32{[rows, per_row]}"
            )
        return Int8(dtype == "int8", block)
    if scale is not None:
        return f"{slot!r} is {dtype} and needs no {slot + '_scale'!r}"
    if dtype == "bfloat16":
        return Bfloat16()
    if dtype in ("float16", "float32", "float64"):
        return Plain(dtype)
    return f"{slot!r} is {dtype}, not a float array or int8/uint8 codes"


def slot_names(keys: Sequence[str]) -> list[str]:
    """The slots of a parameter's stored entries (scales belong to their codes' slot)."""
    return [k for k in keys if not (k.endswith("_scale") and k[: -len("_scale")] in keys)]
