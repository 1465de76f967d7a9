"""The machinery behind ``python -m treeopt.demo``, kept apart from what the demo shows
(:mod:`treeopt.demo.setups`):

- :mod:`~treeopt.demo.harness.cli`: the command line, the time estimate, progress and the
  closing sentences;
- :mod:`~treeopt.demo.harness.training`: the training loop and the validation curve;
- :mod:`~treeopt.demo.harness.report`: the table, ``loss.png`` and ``results.json``;
- :mod:`~treeopt.demo.harness.checkpoints`: stop and resume (``--checkpoint DIR``).

The sweep behind the demo's settings is ``benchmarks/outcome.py``.
"""
