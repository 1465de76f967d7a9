"""Compact optimizer state: ``state_dtype=`` of every built-in optimizer.

- :mod:`.codes`: the arithmetic of the formats (int8 codes, stochastic rounding's random
  bits), written once for arrays and for the compiled loop, with its error bounds.
- :mod:`.formats`: how each slot is stored, read for the rule and written back
  (:class:`StatePrecision`, :class:`Layout`, the forms).

See ``docs/precision.md``.
"""

from treeopt.precision.formats import STATE_DTYPES, Layout, Noise, StatePrecision, layout, state_precision

__all__ = ["STATE_DTYPES", "Layout", "Noise", "StatePrecision", "layout", "state_precision"]
