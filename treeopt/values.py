"""Checks of the numbers an optimizer is given: a hyper-parameter (or a schedule's result)
is one finite number, so a NaN learning rate is refused where it is set, not discovered as
a model full of NaN."""

from __future__ import annotations

import math

from treeopt.backends import backend_of
from treeopt.types import Scalar


def hyper(value: Scalar, what: str) -> Scalar:
    """``value`` if it is a finite number or a 0-d array holding one; else a ``TypeError``
    or ``ValueError`` that says ``what`` it is (e.g. ``"Adam learning_rate"``).

    Inside ``jax.jit`` or ``mx.compile`` a traced value has no number yet: its type and
    shape are checked, its value is not.
    """
    backend = backend_of(value)
    if backend is None or isinstance(value, bool):
        raise TypeError(f"{what} must be a number or a 0-d array, got {type(value).__name__} {_short(value)}")
    if backend.name != "python":
        shape = tuple(backend.shape(value))
        if shape != ():
            raise ValueError(f"{what} must be one number, got an array of shape {shape}")
        if not backend.is_floating(value) and not backend.dtype_name(value).startswith(("int", "uint")):
            raise TypeError(f"{what} must be a number, got an array of dtype {backend.dtype_name(value)}")
    try:
        number = float(value) if backend.name == "python" else backend.to_float(value)
    except Exception:  # a tracer (jax.jit, mx.compile): no value to check yet
        return value
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {number}")
    return value


def _short(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
