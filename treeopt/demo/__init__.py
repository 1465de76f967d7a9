"""The treeopt demo: a NumPy MLP on the 8x8 handwritten digits, trained with Muon + AdamW
through one :class:`~treeopt.MultiOptimizer`, then with plain AdamW, and compared.

Run it with ``python -m treeopt.demo`` (``--quick`` for a few steps). The modules:

- :mod:`treeopt.demo.dataset`: the shipped digits and a seeded train/test split;
- :mod:`treeopt.demo.model`: the MLP, its hand-written backward pass and
  :func:`~treeopt.demo.model.check_gradients`;
- :mod:`treeopt.demo.training`: the two optimizer set-ups and the training loop;
- :mod:`treeopt.demo.cli`: the command line and the printed report.
"""

from treeopt.demo.cli import main
from treeopt.demo.dataset import load_digits, train_test_split
from treeopt.demo.model import check_gradients

__all__ = ["main", "load_digits", "train_test_split", "check_gradients"]
