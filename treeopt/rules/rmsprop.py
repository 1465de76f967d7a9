"""RMSprop: divide by a running root mean square of the gradient.

v <- alpha * v + (1 - alpha) * g^2
p <- p - lr * g / (sqrt(v) + eps)
"""

from __future__ import annotations

from treeopt.ops import sqrt
from treeopt.rules.base import Rule
from treeopt.types import Array, Scalar


def rmsprop_coefficients(lr: Scalar, step: Array, *, alpha: Scalar, eps: Scalar) -> dict[str, Scalar]:
    return dict(lr=lr, alpha=alpha, one_minus_alpha=1 - alpha, eps=eps)


def rmsprop(
    grad: Array, param: Array, v: Array, lr: Scalar, alpha: Scalar, one_minus_alpha: Scalar, eps: Scalar
) -> tuple[Array, ...]:
    v = alpha * v + one_minus_alpha * (grad * grad)
    return param - lr * grad / (sqrt(v) + eps), v


RMSPROP = Rule(
    "rmsprop", rmsprop, rmsprop_coefficients, slots=("v",), slot_meanings={"v": "average of squared gradients"}
)
