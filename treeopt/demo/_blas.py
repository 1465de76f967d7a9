"""Run NumPy's OpenBLAS on one thread for the demo's tiny matrices.

The demo multiplies 128 x 128 matrices: a second BLAS thread costs more in hand-offs than it
saves, and on a busy 2-core machine the spinning threads make each product 5-15x slower
than on one thread. This is best effort: where the library cannot be found (no OpenBLAS,
not Linux) or the user chose a thread count in the environment, nothing changes.
"""

import ctypes
import os
from contextlib import contextmanager

_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads", "openblas_set_num_threads64_")
_ENVIRONMENT = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def _loaded_openblas():
    """The OpenBLAS libraries mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def _thread_controls():
    """``(set_num_threads, get_num_threads)`` of each loaded OpenBLAS."""
    controls = []
    for path in _loaded_openblas():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for setter in _SETTERS:
            getter = setter.replace("set_num", "get_num")
            if hasattr(library, setter) and hasattr(library, getter):
                controls.append((getattr(library, setter), getattr(library, getter)))
                break
    return controls


@contextmanager
def single_threaded_blas():
    """Within the block, OpenBLAS uses one thread; the previous count is restored after."""
    if any(name in os.environ for name in _ENVIRONMENT):
        yield
        return
    controls = _thread_controls()
    previous = [get() for _, get in controls]
    for set_threads, _ in controls:
        set_threads(1)
    try:
        yield
    finally:
        for (set_threads, _), count in zip(controls, previous):
            set_threads(count)
