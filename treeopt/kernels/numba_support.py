"""What the numba runner needs beyond numba itself: raw pointers, and reading a NumPy array's
data pointer, shape and flags from the array object.

Reading ``arr.ctypes.data`` costs about 3 us per array in Python, as much as the whole
memory traffic of a 64 x 64 AdamW step; the ids of the arrays cost 0.1 us. The array object's
layout (``PyArrayObject_fields``: data, nd, dimensions, strides, base, descr, flags) is NumPy's
stable C ABI, so a compiled loop reads the fields from the object's address directly. The
layout is checked against ctypes once at import; if it differs, ``STRUCT_OK`` is False and
pointers are read the slow way.
"""

import ctypes

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# offsets in PyArrayObject_fields (64-bit)
DATA, NDIM, DIMENSIONS, DESCR, FLAGS = 16, 24, 32, 56, 64
C_CONTIGUOUS, WRITEABLE = 0x0001, 0x0400


@intrinsic
def load_int64(typingctx, address):
    """The 64-bit integer stored at ``address``."""

    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()))

    return types.int64(types.int64), codegen


@intrinsic
def load_int32(typingctx, address):
    """The 32-bit integer stored at ``address``, widened to 64 bits."""

    def codegen(context, builder, signature, args):
        value = builder.load(builder.inttoptr(args[0], ir.IntType(32).as_pointer()))
        return builder.sext(value, ir.IntType(64))

    return types.int64(types.int64), codegen


@intrinsic
def as_voidptr(typingctx, address):
    """``address`` as a ``void*`` (for ``numba.carray``)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen


@njit(cache=True)
def numpy_pointers(ids, descr, shapes, ndims, writable, out):
    """Fill ``out`` with the data pointers of the arrays whose ids are ``ids``, checking each
    has dtype ``descr`` (the id of the dtype object), the expected shape, C order, and (if
    ``writable``) the write flag. Returns -1, or the index of the first array that fails."""
    for i in range(ids.shape[0]):
        address = ids[i]
        flags = load_int32(address + FLAGS)
        if load_int64(address + DESCR) != descr or (flags & C_CONTIGUOUS) == 0:
            return i
        if writable and (flags & WRITEABLE) == 0:
            return i
        ndim = load_int32(address + NDIM)
        if ndim != ndims[i]:
            return i
        dimensions = load_int64(address + DIMENSIONS)
        for d in range(ndim):
            if load_int64(dimensions + 8 * d) != shapes[i, d]:
                return i
        out[i] = load_int64(address + DATA)
    return -1


def _struct_matches():
    sample = np.zeros((3, 5), np.float32)
    read = ctypes.c_int64.from_address
    try:
        dimensions = read(id(sample) + DIMENSIONS).value
        return (
            read(id(sample) + DATA).value == sample.ctypes.data
            and ctypes.c_int32.from_address(id(sample) + NDIM).value == 2
            and read(dimensions).value == 3
            and read(dimensions + 8).value == 5
            and read(id(sample) + DESCR).value == id(sample.dtype)
        )
    except (ValueError, OSError):  # pragma: no cover
        return False


STRUCT_OK = ctypes.sizeof(ctypes.c_void_p) == 8 and _struct_matches()
