"""Schedules: functions of the step count that give a hyper-parameter's value.

Any callable ``f(step)`` can be given to an optimizer instead of a number. The step passed
in is the optimizer's step counter before the update (0 on the first update), as an array of
the parameters' library, and the value comes back in that library. Called with a Python
number, these schedules return a NumPy scalar, which has ``.item()`` as MLX's arrays do.
"""

import functools
import math
import numbers
from collections.abc import Sequence

import numpy as np

from treeopt.ops import cos, maximum, minimum, where
from treeopt.types import Schedule


def _has_item(schedule):
    """``schedule``, returning NumPy scalars where it would return Python numbers."""

    @functools.wraps(schedule)
    def wrapped(step):
        value = schedule(step)
        if isinstance(value, numbers.Number) and not isinstance(value, np.generic):
            return np.asarray(value)[()]
        if isinstance(step, numbers.Number) and isinstance(value, np.ndarray) and value.ndim == 0:
            return value[()]  # a NumPy scalar, as for the other schedules
        return value

    return wrapped


__all__ = ["exponential_decay", "step_decay", "cosine_decay", "linear_schedule", "join_schedules"]


def exponential_decay(init: float, decay_rate: float) -> Schedule:
    r"""``init * decay_rate ** step``.

    >>> exponential_decay(0.1, 0.9)(2).item()
    0.08100000000000002
    """

    def schedule(step):
        return init * decay_rate**step

    return _has_item(schedule)


def step_decay(init: float, decay_rate: float, step_size: int) -> Schedule:
    r"""``init * decay_rate ** (step // step_size)``: decay every ``step_size`` steps.

    >>> step_decay(0.1, 0.9, 1000)(2500).item()
    0.08100000000000002
    """
    if step_size < 1:
        raise ValueError(f"step_size must be greater than 0, but got {step_size}.")

    def schedule(step):
        return init * decay_rate ** (step // step_size)

    return _has_item(schedule)


def cosine_decay(init: float, decay_steps: int, end: float = 0.0) -> Schedule:
    r"""Half a cosine from ``init`` to ``end`` over ``decay_steps``, then ``end``:
    ``end + (init - end) * (1 + cos(pi * min(step, decay_steps) / decay_steps)) / 2``.

    >>> round(cosine_decay(0.1, 10, 0.01)(5).item(), 6)
    0.055
    """
    if decay_steps < 1:
        raise ValueError(f"decay_steps must be greater than 0, but got {decay_steps}.")

    def schedule(step):
        progress = minimum(step, decay_steps)
        decay = 0.5 * (1.0 + cos((math.pi / decay_steps) * progress))
        return end + decay * (init - end)

    return _has_item(schedule)


def linear_schedule(init: float, end: float, steps: int) -> Schedule:
    r"""A straight line from ``init`` to ``end`` over ``steps``, then ``end``.

    >>> linear_schedule(0.0, 1.0, 4)(1).item()
    0.25
    """
    if steps < 1:
        raise ValueError(f"steps must be greater than 0, but got {steps}.")

    def schedule(step):
        return minimum(step, steps) * ((end - init) / steps) + init

    return _has_item(schedule)


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    r"""Run ``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]`` (counting its
    steps from that boundary), and so on.

    A later schedule never sees a negative or wrapped step: before its boundary it is
    evaluated at 0 and its value is not used.

    >>> warmup = join_schedules([linear_schedule(0.0, 1.0, 10), cosine_decay(1.0, 100)], [10])
    >>> warmup(5).item(), warmup(10).item()
    (0.5, 1.0)
    """
    schedules, boundaries = list(schedules), list(boundaries)
    if len(schedules) == 0:
        raise ValueError("Must provide at least 1 schedule to join.")
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(f"Received {len(boundaries)} boundaries but expected {len(schedules) - 1}.")
    if any(b < a for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must not decrease, got {boundaries}")

    def schedule(step):
        value = schedules[0](step)
        for boundary, later in zip(boundaries, schedules[1:]):
            value = where(step < boundary, value, later(maximum(step, boundary) - boundary))
        return value

    return _has_item(schedule)
