"""Fast paths: the same rules, run over many tensors at once.

- :mod:`.numba_kernels`: an elementwise rule compiled by numba into one parallel loop over
  tables of pointers (NumPy arrays and CPU torch tensors, float32/float64), used by
  :mod:`.compiled_step` for ``update`` on trees whose structure does not change.

The per-tensor rule (``treeopt.engine.run_rule``) stays the reference: the tests check every
fast path against it. Fast paths need ``numba`` (``pip install numba``, or the ``fast`` extra); without it,
or with ``TREEOPT_KERNELS=0`` in the environment, or ``treeopt.kernels.enabled = False``,
every step takes the reference path.

- :mod:`treeopt.backends.torch_runners`: an elementwise rule over a list of torch tensors
  without numba: a Triton kernel generated from the rule (accelerators), torch's foreach
  operations (CPU without numba; accelerators without Triton), or one ``torch.compile``d
  step. ``torch_runner`` (or ``TREEOPT_TORCH_RUNNER``) chooses: ``"auto"`` (numba on CPU,
  else foreach; Triton on accelerators, else foreach), or ``"foreach"``, ``"triton"``,
  ``"compile"`` on every device (Triton on CPU tensors needs ``TRITON_INTERPRET=1``: for
  tests), or ``"numba"`` (numba on CPU, per tensor elsewhere).
- :mod:`.expression`: an elementwise rule traced into the array operations those runners run.
- :mod:`treeopt.backends.torch_graphs`: a stackable rule (Muon) on torch tensors, replayed as
  a CUDA graph after two steps. ``torch_graphs`` (or ``TREEOPT_TORCH_GRAPHS``): ``"auto"``
  (CUDA tensors), ``"always"`` (CPU tensors too, eager: for tests), ``"never"``.
- :mod:`.stacking`: same-shape tensors of a stackable rule (Muon) updated as one stack.

Threads: numba's ``NUMBA_NUM_THREADS``, else ``TREEOPT_NUM_THREADS`` or ``OMP_NUM_THREADS``
when set, else every core; :func:`set_num_threads` changes it at run time.
"""

from __future__ import annotations

import importlib.util
import os

#: False: every step takes the per-tensor reference path
enabled = os.environ.get("TREEOPT_KERNELS", "1") not in ("0", "false", "no", "off")

#: True: in a process that has not loaded a compiled loop yet, the loops load in a thread
#: while the first steps run per tensor (numba's start-up takes longer than a small step).
#: Off by default: numba compiling in a thread while JAX compiles in the main thread has
#: aborted the process (both drive LLVM), so the loops build at the end of the first step
load_in_background = os.environ.get("TREEOPT_KERNELS_BACKGROUND", "0") in ("1", "true", "yes", "on")

#: the runner of torch tensors of elementwise rules: "auto", "foreach", "triton", "compile", "numba"
torch_runner = os.environ.get("TREEOPT_TORCH_RUNNER", "auto")

#: where torch tensors of stackable rules (Muon) run as a captured CUDA graph: "auto", "always", "never"
torch_graphs = os.environ.get("TREEOPT_TORCH_GRAPHS", "auto")

_numba = None


def numba_available() -> bool:
    """Whether numba can be used (installed, and fast paths enabled)."""
    global _numba
    if not enabled:
        return False
    if _numba is None:
        _numba = importlib.util.find_spec("numba") is not None  # found, not imported: that takes a while
    return _numba


def threads_from_environment() -> None:
    """Apply ``TREEOPT_NUM_THREADS`` or ``OMP_NUM_THREADS`` to numba's loops (when numba's own
    ``NUMBA_NUM_THREADS`` is not set); run when the loops' module is imported."""
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
