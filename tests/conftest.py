"""Session set-up shared by every test file.

Distributed tests fork their ranks (0.2 s a world, against 13-29 s to spawn one here), and a
process that has used GNU OpenMP cannot fork safely: numba's parallel loops use its
workqueue layer instead, and idle threads wait passively (several ranks share 2 cores).
Both must be set before numba or torch start their thread pools. The compiled loops build at
the end of a first step, not in a thread as in a new user process, so tests see the loop they
check (tests/test_kernels.py checks the loading in a thread).
"""

import os

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TREEOPT_KERNELS_BACKGROUND", "0")

# pytest's warning filters (pyproject.toml) name treeopt.RoutingWarning, so treeopt is imported
# before this file runs: the setting is applied to the module too, not only to subprocesses
import treeopt.kernels  # noqa: E402

treeopt.kernels.load_in_background = False
