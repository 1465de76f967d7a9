"""Stochastic gradient descent with momentum, dampening, Nesterov and coupled weight decay.

    g <- g + wd * p                        (if wd != 0)
    v <- mu * v + (1 - tau) * g            (if mu > 0)
    d <- g + mu * v if nesterov else v     (d = g without momentum)
    p <- p - lr * d

As in MLX the buffer starts at zero and dampening applies from the first step.
"""

from __future__ import annotations

from treeopt.rules.base import Rule, active
from treeopt.types import Array, Scalar


def sgd_coefficients(
    lr: Scalar, step: Array, *, momentum: Scalar, weight_decay: Scalar, dampening: Scalar, nesterov: bool
) -> dict[str, Scalar]:
    return dict(
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        one_minus_dampening=1 - dampening,
        decays=active(weight_decay),
        uses_momentum=active(momentum, lambda m: m > 0),
        dampens=active(dampening, lambda d: d > 0),
        nesterov=nesterov,
    )


def sgd(
    grad: Array,
    param: Array,
    v: Array,
    lr: Scalar,
    momentum: Scalar,
    weight_decay: Scalar,
    one_minus_dampening: Scalar,
    decays: bool,
    uses_momentum: bool,
    dampens: bool,
    nesterov: bool,
) -> tuple[Array, ...]:
    if decays:
        grad = grad + weight_decay * param
    if not uses_momentum:
        return param - lr * grad, v
    v = momentum * v
    v = v + (one_minus_dampening * grad if dampens else grad)
    direction = grad + momentum * v if nesterov else v
    return param - lr * direction, v


SGD = Rule("sgd", sgd, sgd_coefficients, slots=("v",), slot_meanings={"v": "momentum buffer"})
