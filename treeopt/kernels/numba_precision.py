"""The compiled loop of an elementwise rule whose slots are stored compactly (``state_dtype``).

The loop of :mod:`.numba_kernels` with the state formats of :mod:`treeopt.precision` fused
around the inlined rule, so a step reads and writes each byte of the state once: per block of
at most ``BLOCK`` elements of one row, the loop reads the slots (int8 codes times their block's
scale, bfloat16 widened), runs the rule and writes the parameter, keeps the new int8-stored
slots in a small buffer, takes their maximum, then writes the codes and the block's scale.
bfloat16 slots are rounded stochastically in the same pass, with the random bits of
:mod:`treeopt.precision.codes` drawn from the element's index. Work items are runs of whole
blocks (a block is never split between threads), balanced as :func:`.numba_kernels.work_items`
balances elements.

The codes are the same bytes as the per-tensor runner's (the formats' array code), which the
tests check.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from treeopt.kernels.numba_kernels import coefficient_names, load_generated, segment_length, work_items
from treeopt.precision import codes
from treeopt.precision.formats import Bfloat16, Form, Int8, Plain

#: how the loop handles each form: "f32" (in place), "bf16", "i8", "u8"
KINDS = ("f32", "bf16", "i8", "u8")


def kind_of(form: Form) -> str | None:
    """The loop's kind of a slot's form, or ``None`` when the loop cannot run it."""
    if isinstance(form, Plain) and form.dtype == "float32":
        return "f32"
    if isinstance(form, Bfloat16):
        return "bf16"
    if isinstance(form, Int8) and form.block == codes.BLOCK:
        return "i8" if form.signed else "u8"
    return None


@intrinsic
def float_bits(typingctx, x):
    """The bit pattern of a float32, as an int32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_float(typingctx, x):
    """The float32 whose bit pattern is the int32 ``x``."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def magnitude_bits(typingctx, x):
    """The bit pattern of ``|x|`` (a float32), as an int32: ordered as the magnitudes are, and
    above the largest finite float's for a NaN or an infinity."""

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], ir.IntType(32))
        return builder.and_(bits, ir.Constant(ir.IntType(32), 0x7FFFFFFF))

    return types.int32(types.float32), codegen


@intrinsic
def widen_bfloat16(typingctx, half):
    """The float32 of a bfloat16's 16 bits (a uint16)."""

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def round_bfloat16(typingctx, x, salt, index):
    """``x`` (float32) rounded to bfloat16 stochastically (its 16 bits, a uint16): 16 random
    bits ``mix32(salt ^ index) >> 16`` added to its bit pattern, the low half dropped; a NaN
    stays a (quiet) NaN. The arithmetic of :mod:`treeopt.precision.codes` and
    :meth:`treeopt.backends.base.Backend.round_bfloat16`, in 32-bit integer operations (they
    vectorise; 64-bit products would not, or slowly)."""

    def codegen(context, builder, signature, args):
        i32, i16 = ir.IntType(32), ir.IntType(16)

        def constant(value):
            return ir.Constant(i32, value)

        value, salt_value, index_value = args
        bits = builder.bitcast(value, i32)
        h = builder.xor(builder.trunc(salt_value, i32), index_value)
        first, second, _ = codes.MIX_CONSTANTS  # lowbias32: products modulo 2^32
        h = builder.xor(h, builder.lshr(h, constant(16)))
        h = builder.mul(h, constant(first))
        h = builder.xor(h, builder.lshr(h, constant(15)))
        h = builder.mul(h, constant(second))
        h = builder.xor(h, builder.lshr(h, constant(16)))
        # a NaN keeps its high half with the quiet bit set, and takes no random bits (they could
        # carry into the exponent); chosen before the shift: one select on 32-bit lanes
        quiet = builder.or_(bits, constant(0x00400000))
        added = builder.add(bits, builder.lshr(h, constant(16)))
        chosen = builder.select(builder.fcmp_unordered("uno", value, value), quiet, added)
        return builder.trunc(builder.lshr(chosen, constant(16)), i16)

    return types.uint16(types.float32, types.int64, types.int32), codegen


@intrinsic
def low_bits(typingctx, x):
    """The low 32 bits of an int64, as an int32 (an element's index for the random bits)."""

    def codegen(context, builder, signature, args):
        return builder.trunc(args[0], ir.IntType(32))

    return types.int32(types.int64), codegen


@intrinsic
def successor(typingctx, x):
    """``x + 1`` in 32 bits, wrapping (numba would widen an int32 sum to int64, and the loop
    would then count in 64-bit lanes: a third of a bfloat16 step's integer work)."""

    def codegen(context, builder, signature, args):
        return builder.add(args[0], ir.Constant(ir.IntType(32), 1))

    return types.int32(types.int32), codegen


# the codes of :mod:`treeopt.precision.codes`, for float32 scalars, the same numbers in fewer
# operations (every operand is known non-negative or finite here)
@numba.njit(inline="always")
def signed_value(code, step):
    return code * abs(code) * step


@numba.njit(inline="always")
def unsigned_value(code, step):
    square = code * code
    return square * square * step


@numba.njit(inline="always")
def signed_code(x, inverse, levels, half):
    # sign(x) * floor(...): the sign copied onto the (non-negative) floor is the same number
    return np.int8(math.copysign(np.floor(np.sqrt(abs(x) * inverse) * levels + half), x))


@numba.njit(inline="always")
def unsigned_code(x, inverse, levels, half):
    return np.uint8(np.floor(np.sqrt(np.sqrt(x * inverse)) * levels + half))


_TEMPLATE = """\
# Generated by treeopt.kernels.numba_precision from {module}.{function}; do not edit.
import numpy as np
from numba import carray, njit, prange

from treeopt.kernels.numba_kernels import scalar_version
from treeopt.kernels.numba_precision import (
    bits_float, low_bits, magnitude_bits, round_bfloat16, signed_code, signed_value, successor, unsigned_code,
    unsigned_value, widen_bfloat16,
)
from treeopt.kernels.numba_support import as_voidptr
from {module} import {function} as _update

rule = scalar_version(_update)
BLOCK = {block}


@njit(parallel=True, cache={cache}, error_model="numpy")  # no division check: the loops vectorise
def kernel(grad_ptrs, param_ptrs, slot_ptrs, scale_ptrs, pieces, items, columns, per_row, rows, table, flags, salts,
           offsets):
    # work item w: pieces[items[w]:items[w + 1]], each (tensor, first block, end block); a
    # block is at most BLOCK elements of one row of its tensor (rows of columns[i] elements)
    zero, one, half = np.float32(0.0), np.float32(1.0), np.float32(0.5)
    signed_levels, unsigned_levels = np.float32({signed_levels}), np.float32({unsigned_levels})
    signed_unit, unsigned_unit = np.float32({signed_unit!r}), np.float32({unsigned_unit!r})
    nan = np.float32(np.nan)
    infinity = np.int32(0x7F800000)
    for w in prange(items.shape[0] - 1):
{buffers}
        for s in range(items[w], items[w + 1]):
            i = pieces[s, 0]
            width = columns[i]
            blocks = per_row[i]
            row = rows[i]
{coefficients}
            for b in range(pieces[s, 1], pieces[s, 2]):
                r = b // blocks
                first = (b - r * blocks) * BLOCK
                start = r * width + first
                n = min(BLOCK, width - first)
{index}
                g = carray(as_voidptr(grad_ptrs[i] + start * 4), n, np.float32)
                p = carray(as_voidptr(param_ptrs[i] + start * 4), n, np.float32)
{slot_arrays}
                for j in range(n):
{loads}
                    {targets} = rule(g[j], p[j], {arguments})
{stores}
{encodes}
"""


def _source(rule: Any, kinds: tuple[str, ...], static: tuple[str, ...], cache: bool) -> tuple[str, list[str]]:
    update = rule.update
    names, numeric = coefficient_names(rule, static)
    coefficients = "\n".join(f"            c{k} = table[row, {k}]" for k in range(len(numeric)))
    buffers, arrays, loads, stores, targets, arguments = [], [], [], [], ["p[j]"], []
    scales: list[str] = []
    encoded: list[str] = []
    encodes: list[str] = []
    for k, kind in enumerate(kinds):
        pointer = f"slot_ptrs[i, {k}]"
        if kind == "f32":
            arrays.append(f"                s{k} = carray(as_voidptr({pointer} + start * 4), n, np.float32)")
            targets.append(f"s{k}[j]")
            arguments.append(f"s{k}[j]")
            continue
        targets.append(f"t{k}")
        arguments.append(f"l{k}")
        if kind == "bf16":
            arrays.append(f"                s{k} = carray(as_voidptr({pointer} + start * 2), n, np.uint16)")
            arrays.append(f"                salt{k} = salts[i, {k}]")
            loads.append(f"                    l{k} = widen_bfloat16(s{k}[j])")
            stores.append(f"                    s{k}[j] = round_bfloat16(t{k}, salt{k}, index)")
            continue
        signed = kind == "i8"
        code_type, value, code = (
            ("np.int8", "signed_value", "signed_code") if signed else ("np.uint8", "unsigned_value", "unsigned_code")
        )
        levels, unit = ("signed_levels", "signed_unit") if signed else ("unsigned_levels", "unsigned_unit")
        buffers.append(f"        buffer{k} = np.empty(BLOCK, np.float32)")
        arrays += [
            f"                s{k} = carray(as_voidptr({pointer} + start), n, {code_type})",
            f"                scale{k} = carray(as_voidptr(scale_ptrs[i, {k}] + b * 4), 1, np.float32)",
            f"                step{k} = scale{k}[0] * {unit}",
            f"                top{k} = np.int32(0)",
        ]
        loads.append(f"                    l{k} = {value}(np.float32(s{k}[j]), step{k})")
        # the new value kept for the encoding, and the block's largest magnitude (the integer
        # maximum of the bit patterns: a reduction the loop vectorises)
        stores.append(f"                    buffer{k}[j] = t{k}")
        stores.append(f"                    top{k} = max(top{k}, magnitude_bits(t{k}))")
        scales += [
            f"                if top{k} >= infinity:  # a NaN or an infinity: the block reads back as NaN",
            f"                    scale{k}[0] = nan",
            f"                    inverse{k} = zero",
            "                else:",
            f"                    largest = bits_float(top{k})",
            f"                    inverse{k} = one / largest if largest > zero else zero",
            f"                    scale{k}[0] = largest",
        ]
        encoded.append(
            f"                    s{k}[j] = {code}(buffer{k}[j], inverse{k}, {levels}, half) if top{k} < infinity else 0"
        )
    index = ""
    if "bf16" in kinds:
        # the element's index in the whole tensor (a shard's offset), modulo 2^32, counted in
        # 32-bit lanes for the random bits
        index = "                index = low_bits(offsets[i] + start)"
        stores.append("                    index = successor(index)")
    if scales:
        encodes = scales + ["                for j in range(n):"] + encoded
    values = [f"flags[{static.index(n)}]" if n in static else f"c{numeric.index(n)}" for n in names]
    source = _TEMPLATE.format(
        module=update.__module__,
        function=update.__name__,
        block=block_of(kinds),
        cache=cache,
        index=index,
        signed_levels=float(codes.SIGNED_LEVELS),
        unsigned_levels=float(codes.UNSIGNED_LEVELS),
        signed_unit=float(np.float32(codes.SIGNED_UNIT)),
        unsigned_unit=float(np.float32(codes.UNSIGNED_UNIT)),
        buffers="\n".join(buffers) or "        pass",
        coefficients=coefficients,
        slot_arrays="\n".join(arrays),
        loads="\n".join(loads),
        targets=", ".join(targets),
        arguments=", ".join(arguments + values),
        stores="\n".join(stores),
        encodes="\n".join(encodes),
    )
    return source, numeric


@functools.cache
def kernel_for(
    rule: Any, kinds: tuple[str, ...], static: tuple[str, ...] = ()
) -> tuple[Callable[..., None], list[str]]:
    """``(kernel, names of the numeric coefficients)`` for an elementwise rule on float32
    parameters whose slots are stored as ``kinds`` (one of :data:`KINDS` per slot)."""
    source, numeric = _source(rule, kinds, static, cache=True)
    depends_on = inspect.getsource(sys.modules[rule.update.__module__]) + inspect.getsource(codes)
    uncached = lambda: _source(rule, kinds, static, cache=False)[0]  # noqa: E731
    module = load_generated(f"{rule.name}_stored", source, depends_on, uncached)
    return module.kernel, numeric


#: elements per block of a loop without int8 slots (no scale to share: long inner loops)
CHUNK = 4096


def block_of(kinds: tuple[str, ...]) -> int:
    """Elements per block of the loop of slots stored as ``kinds``: an int8 format's block, or
    :data:`CHUNK`."""
    return codes.BLOCK if any(kind in ("i8", "u8") for kind in kinds) else CHUNK


def block_items(
    shapes: list[tuple[int, ...]], by_rows: bool, threads: int | None = None, block: int = codes.BLOCK
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(pieces, items, columns, per_row)``: work items of whole blocks for tensors of
    ``shapes``, balanced over the threads. With ``by_rows`` (int8 slots), a block is at most
    ``BLOCK`` elements of one row, as the format cuts it; otherwise the tensor is one row."""
    sizes = [int(np.prod(s)) for s in shapes]
    if by_rows:
        rows = [s[0] if s else 1 for s in shapes]
        columns = [int(np.prod(s[1:])) if len(s) > 1 else 1 for s in shapes]
    else:
        rows, columns = [1] * len(shapes), sizes
    per_row = [-(-c // block) for c in columns]
    blocks = [r * b for r, b in zip(rows, per_row)]
    segment = max(1, segment_length(sum(sizes), threads) // block)
    pieces, items = work_items(blocks, threads, segment)
    return pieces, items, np.array(columns, np.int64), np.array(per_row, np.int64)
