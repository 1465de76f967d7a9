"""Session set-up shared by every test file.

Distributed tests fork their ranks (0.2 s a world, against 13-29 s to spawn one here), and a
process that has used GNU OpenMP cannot fork safely: numba's parallel loops use its
workqueue layer instead, and idle threads wait passively (several ranks share 2 cores).
Both must be set before numba or torch start their thread pools.
"""

import os

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
