"""General matrix multiply with BLAS's ``alpha`` and ``beta``, on NumPy arrays.

NumPy's ``matmul`` has no ``beta``: ``a X + B X`` costs a product and then two more passes
over memory (scale, add) and two temporaries. BLAS's GEMM computes
``C = alpha A B + beta C`` in one call. This module calls the ``cblas_?gemm`` of the OpenBLAS
that NumPy ships (found among the loaded libraries), through ctypes, on the arrays' own
memory. Where it cannot be found, :func:`gemm` is ``None`` and callers use NumPy.
"""

import ctypes

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _find():
    """``{dtype: cblas gemm function}`` from NumPy's OpenBLAS (64-bit integer interface)."""
    np.dot(np.ones((2, 2)), np.ones((2, 2)))  # make sure NumPy's BLAS is loaded
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        return {}
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        found = {}
        for dtype, names, scalar in ((np.float32, ("scipy_cblas_sgemm64_", "cblas_sgemm64_"), ctypes.c_float),
                                     (np.float64, ("scipy_cblas_dgemm64_", "cblas_dgemm64_"), ctypes.c_double)):
            for name in names:
                function = getattr(library, name, None)
                if function is not None:
                    i64, ptr = ctypes.c_int64, ctypes.c_void_p
                    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, scalar, ptr, i64,
                                         ptr, i64, scalar, ptr, i64]
                    function.restype = None
                    found[np.dtype(dtype)] = function
                    break
        if len(found) == 2:
            return found
    return {}


_GEMM = _find()


def _operand(x):
    """``(transpose flag, leading dimension)`` for a 2-D array in C or Fortran order."""
    if x.flags.c_contiguous:
        return _NO_TRANS, max(1, x.shape[1])
    if x.flags.f_contiguous:
        return _TRANS, max(1, x.shape[0])
    return None


def gemm(alpha, a, b, beta, c):
    """``c <- alpha a @ b + beta c`` in place (``c`` C-contiguous, not overlapping ``a`` or
    ``b``); returns False (and changes nothing) when BLAS cannot take these arrays."""
    function = _GEMM.get(c.dtype)
    if function is None or a.dtype != c.dtype or b.dtype != c.dtype or a.ndim != 2 or b.ndim != 2:
        return False
    if not c.flags.c_contiguous or not c.flags.writeable:
        return False
    ta, tb = _operand(a), _operand(b)
    if ta is None or tb is None:
        return False
    (m, k), n = a.shape, b.shape[1]
    if c.shape != (m, n) or b.shape[0] != k or 0 in (m, n, k):
        return False
    # a Fortran-ordered array is the transpose of a C-ordered one with swapped leading dimension
    function(_ROW_MAJOR, ta[0], tb[0], m, n, k, alpha, a.ctypes.data, ta[1], b.ctypes.data, tb[1], beta,
             c.ctypes.data, max(1, n))
    return True


available = bool(_GEMM)
