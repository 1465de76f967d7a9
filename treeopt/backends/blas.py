"""General matrix multiply with BLAS's ``alpha`` and ``beta``, on NumPy arrays.

NumPy's ``matmul`` has no ``beta``: ``a X + B X`` costs a product and then two more passes
over memory (scale, add) and two temporaries. BLAS's GEMM computes
``C = alpha A B + beta C`` in one call. This module calls the ``cblas_?gemm`` of the OpenBLAS
that NumPy ships (found among the loaded libraries), through ctypes, on the arrays' own
memory. Where it cannot be found, :func:`gemm` returns False and callers use NumPy.

Stacks of matrices (3-D arrays) make one GEMM per matrix, from a compiled loop when numba is
there (one call from Python for the whole stack), else from Python: each matrix gets the
same call, so the numbers are those of the matrices one by one.
"""

from __future__ import annotations

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
        for dtype, names, scalar in (
            (np.float32, ("scipy_cblas_sgemm64_", "cblas_sgemm64_"), ctypes.c_float),
            (np.float64, ("scipy_cblas_dgemm64_", "cblas_dgemm64_"), ctypes.c_double),
        ):
            for name in names:
                function = getattr(library, name, None)
                if function is not None:
                    i64, ptr = ctypes.c_int64, ctypes.c_void_p
                    function.argtypes = [
                        ctypes.c_int,
                        ctypes.c_int,
                        ctypes.c_int,
                        i64,
                        i64,
                        i64,
                        scalar,
                        ptr,
                        i64,
                        ptr,
                        i64,
                        scalar,
                        ptr,
                        i64,
                    ]
                    function.restype = None
                    found[np.dtype(dtype)] = function
                    break
        if len(found) == 2:
            return found
    return {}


_GEMM = _find()


def _operand(x):
    """``(transpose flag, leading dimension)`` for the (last two dimensions of the) matrices of
    ``x`` in C or Fortran order."""
    rows, cols = x.shape[-2:]
    row_stride, col_stride = x.strides[-2:]
    if (col_stride == x.itemsize or cols <= 1) and (row_stride == cols * x.itemsize or rows <= 1):
        return _NO_TRANS, max(1, cols)
    if (row_stride == x.itemsize or rows <= 1) and (col_stride == rows * x.itemsize or cols <= 1):
        return _TRANS, max(1, rows)
    return None


def gemm(alpha: float, a: np.ndarray, b: np.ndarray, beta: float, c: np.ndarray) -> bool:
    """``c <- alpha a @ b + beta c`` in place (``c`` C-contiguous, not overlapping ``a`` or
    ``b``); returns False (and changes nothing) when BLAS cannot take these arrays."""
    function = _GEMM.get(c.dtype)
    if (
        function is None
        or a.dtype != c.dtype
        or b.dtype != c.dtype
        or not a.ndim == b.ndim == c.ndim
        or a.ndim not in (2, 3)
    ):
        return False
    if not c.flags.c_contiguous or not c.flags.writeable:
        return False
    ta, tb = _operand(a), _operand(b)
    if ta is None or tb is None:
        return False
    (m, k), n = a.shape[-2:], b.shape[-1]
    if c.shape[-2:] != (m, n) or b.shape[-2] != k or 0 in (m, n, k) or not a.shape[:-2] == b.shape[:-2] == c.shape[:-2]:
        return False
    # a Fortran-ordered array is the transpose of a C-ordered one with swapped leading dimension
    if a.ndim == 2:
        function(
            _ROW_MAJOR,
            ta[0],
            tb[0],
            m,
            n,
            k,
            alpha,
            a.ctypes.data,
            ta[1],
            b.ctypes.data,
            tb[1],
            beta,
            c.ctypes.data,
            max(1, n),
        )
        return True
    if _numba_stack(function, ta, tb, m, n, k, alpha, a, b, beta, c):
        return True
    for x, y, z in zip(a, b, c):
        function(
            _ROW_MAJOR,
            ta[0],
            tb[0],
            m,
            n,
            k,
            alpha,
            x.ctypes.data,
            ta[1],
            y.ctypes.data,
            tb[1],
            beta,
            z.ctypes.data,
            max(1, n),
        )
    return True


def _numba_stack(function, ta, tb, m, n, k, alpha, a, b, beta, c):
    """The GEMMs of a stack from one compiled loop; False without numba."""
    # numba is optional, and the kernels sit above the backends: the stacked GEMM is theirs
    from treeopt.kernels import numba_available

    if not numba_available():
        return False
    # the same: loaded once numba is found
    from treeopt.kernels.numba_support import gemm_stack

    scalar = c.dtype.type
    gemm_stack(
        ctypes.cast(function, ctypes.c_void_p).value,
        c.shape[0],
        ta[0],
        tb[0],
        m,
        n,
        k,
        scalar(alpha),
        a.ctypes.data,
        a.strides[0],
        ta[1],
        b.ctypes.data,
        b.strides[0],
        tb[1],
        scalar(beta),
        c.ctypes.data,
        c.strides[0],
        max(1, n),
    )
    return True


available = bool(_GEMM)
