"""The treeopt demo: Muon and AdamW routed in one optimizer, on a small GPT.

``python -m treeopt.demo`` trains a byte-level GPT (PyTorch, CPU) on the source of Python's
standard library three times, on the same seed and batches: tuned AdamW, Muon on every matrix
(the naive use), and :func:`treeopt.muon_adamw` (Muon on the hidden matrices, AdamW on the
rest), and compares them. ``--quick`` runs 50 steps a run (about a minute).

What to read:

- :mod:`treeopt.demo.setups`: the three optimizer set-ups, the routing the demo is about;
- :mod:`treeopt.demo.gpt`: the model, whose parameter names the routing sees;
- :mod:`treeopt.demo.text`: the shipped text and its training/validation split.

:mod:`treeopt.demo.harness` runs the experiment (the command line, the training loop and its
progress, the table, ``loss.png``, checkpoints); nothing in it is needed to use treeopt.
"""
