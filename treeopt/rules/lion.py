"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

c  = b1 * m + (1 - b1) * g
m <- b2 * m + (1 - b2) * g
p <- p * (1 - lr * wd)        (if wd > 0)
p <- p - lr * sign(c)
"""

from __future__ import annotations

from treeopt.ops import sign
from treeopt.rules.base import Rule, active
from treeopt.types import Array, Scalar


def lion_coefficients(
    lr: Scalar, step: Array, *, betas: tuple[Scalar, Scalar], weight_decay: Scalar
) -> dict[str, Scalar]:
    b1, b2 = betas
    return dict(
        lr=lr,
        b1=b1,
        one_minus_b1=1 - b1,
        b2=b2,
        one_minus_b2=1 - b2,
        decay=1 - lr * weight_decay,
        decays=active(weight_decay, lambda wd: wd > 0),
    )


def lion(
    grad: Array,
    param: Array,
    m: Array,
    lr: Scalar,
    b1: Scalar,
    one_minus_b1: Scalar,
    b2: Scalar,
    one_minus_b2: Scalar,
    decay: Scalar,
    decays: bool,
) -> tuple[Array, ...]:
    c = b1 * m + one_minus_b1 * grad
    m = b2 * m + one_minus_b2 * grad
    if decays:
        param = decay * param
    return param - lr * sign(c), m


LION = Rule("lion", lion, lion_coefficients, slots=("m",), slot_meanings={"m": "average of gradients"})
