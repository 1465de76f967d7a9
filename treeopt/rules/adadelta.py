"""AdaDelta: step sizes from running averages of squared gradients and squared updates.

v <- rho * v + (1 - rho) * g^2
d  = sqrt(u + eps) / sqrt(v + eps) * g
u <- rho * u + (1 - rho) * d^2
p <- p - lr * d
"""

from __future__ import annotations

from treeopt.ops import sqrt
from treeopt.rules.base import Rule
from treeopt.types import Array, Scalar


def adadelta_coefficients(lr: Scalar, step: Array, *, rho: Scalar, eps: Scalar) -> dict[str, Scalar]:
    return dict(lr=lr, rho=rho, one_minus_rho=1 - rho, eps=eps)


def adadelta(
    grad: Array, param: Array, v: Array, u: Array, lr: Scalar, rho: Scalar, one_minus_rho: Scalar, eps: Scalar
) -> tuple[Array, ...]:
    v = rho * v + one_minus_rho * (grad * grad)
    d = sqrt(u + eps) / sqrt(v + eps) * grad
    u = rho * u + one_minus_rho * (d * d)
    return param - lr * d, v, u


ADADELTA = Rule(
    "adadelta",
    adadelta,
    adadelta_coefficients,
    slots=("v", "u"),
    slot_meanings={"v": "average of squared gradients", "u": "average of squared updates"},
)
