"""Fast paths: the same rules, run over many tensors at once.

- :mod:`.numba_kernels`: an elementwise rule compiled by numba into one parallel loop over
  tables of pointers (NumPy arrays and CPU torch tensors, float32/float64), used by
  :mod:`.compiled_step` for ``update`` on trees whose structure does not change.

The per-tensor rule (``treeopt.engine.run_rule``) stays the reference: the tests check every
fast path against it. Fast paths need ``numba`` (``pip install treeopt[fast]``); without it,
or with ``TREEOPT_KERNELS=0`` in the environment, or ``treeopt.kernels.enabled = False``,
every step takes the reference path.

- :mod:`treeopt.backends.torch_compiled`: an elementwise rule over a list of torch tensors as
  one ``torch.compile``d step, for tensors on accelerators (CUDA). ``torch_compile`` (or
  ``TREEOPT_TORCH_COMPILE``) chooses: ``"auto"`` (accelerators only), ``"always"`` (CPU
  tensors too: for testing it), ``"never"``.
- :mod:`.stacking`: same-shape tensors of a stackable rule (Muon) updated as one stack.

Threads: numba's ``NUMBA_NUM_THREADS``, else ``TREEOPT_NUM_THREADS`` or ``OMP_NUM_THREADS``
when set, else every core; :func:`set_num_threads` changes it at run time.
"""

from __future__ import annotations

import importlib.util
import os

#: False: every step takes the per-tensor reference path
enabled = os.environ.get("TREEOPT_KERNELS", "1") not in ("0", "false", "no", "off")

#: where torch tensors of elementwise rules run as a torch.compile'd step: "auto", "always", "never"
torch_compile = os.environ.get("TREEOPT_TORCH_COMPILE", "auto")

_numba = None


def numba_available() -> bool:
    """Whether numba can be used (installed, and fast paths enabled)."""
    global _numba
    if not enabled:
        return False
    if _numba is None:
        _numba = importlib.util.find_spec("numba") is not None
        if _numba:
            _threads_from_environment()
    return _numba


def _threads_from_environment():
    if "NUMBA_NUM_THREADS" in os.environ:
        return
    for name in ("TREEOPT_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").isdigit():
            set_num_threads(int(os.environ[name]))
            return


def set_num_threads(count: int) -> None:
    """Threads of the compiled loops (at most numba's pool size, the core count)."""
    # optional: treeopt[fast]
    import numba

    numba.set_num_threads(max(1, min(int(count), numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


def get_num_threads() -> int:
    # optional: treeopt[fast]
    import numba

    return numba.get_num_threads()
