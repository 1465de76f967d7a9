"""The treeopt demo: a small byte-level GPT (PyTorch) trained on Python's standard library
three times, on the same seed and batches: tuned AdamW, Muon on every matrix (the naive
use), and :func:`treeopt.muon_adamw` (Muon on the hidden matrices, AdamW on the rest).

Run it with ``python -m treeopt.demo`` (``--quick`` for under a minute). The modules:

- :mod:`treeopt.demo.text`: the shipped text and its training/validation split;
- :mod:`treeopt.demo.gpt`: the model;
- :mod:`treeopt.demo.setups`: the three optimizer set-ups and their tuned settings;
- :mod:`treeopt.demo.training_gpt`: the training loop and the validation curve;
- :mod:`treeopt.demo.checkpoints`: stop and resume (``--checkpoint DIR``);
- :mod:`treeopt.demo.report`: the table, ``loss.png`` and ``results.json``;
- :mod:`treeopt.demo.cli`: the command line.

``python -m treeopt.demo digits`` runs the NumPy example, no framework needed: an MLP on the
8x8 digits (:mod:`treeopt.demo.digits`, :mod:`~treeopt.demo.dataset`,
:mod:`~treeopt.demo.model`, :mod:`~treeopt.demo.training`).
"""

from treeopt.demo.cli import main
from treeopt.demo.dataset import load_digits, train_test_split
from treeopt.demo.model import check_gradients

__all__ = ["main", "load_digits", "train_test_split", "check_gradients"]
