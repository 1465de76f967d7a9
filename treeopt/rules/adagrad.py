"""Adagrad: divide by the root of the sum of all squared gradients so far.

v <- v + g^2
p <- p - lr * g / (sqrt(v) + eps)
"""

from __future__ import annotations

from treeopt.ops import sqrt
from treeopt.rules.base import Rule
from treeopt.types import Array, Scalar


def adagrad_coefficients(lr: Scalar, step: Array, *, eps: Scalar) -> dict[str, Scalar]:
    return dict(lr=lr, eps=eps)


def adagrad(grad: Array, param: Array, v: Array, lr: Scalar, eps: Scalar) -> tuple[Array, ...]:
    v = v + grad * grad
    return param - lr * grad / (sqrt(v) + eps), v


ADAGRAD = Rule("adagrad", adagrad, adagrad_coefficients, slots=("v",), slot_meanings={"v": "sum of squared gradients"})
