"""Adagrad: divide by the root of the sum of all squared gradients so far.

v <- v + g^2
p <- p - lr * g / (sqrt(v) + eps)
"""

from treeopt.ops import sqrt
from treeopt.rules.base import Rule


def adagrad_coefficients(lr, step, *, eps):
    return dict(lr=lr, eps=eps)


def adagrad(grad, param, v, lr, eps):
    v = v + grad * grad
    return param - lr * grad / (sqrt(v) + eps), v


ADAGRAD = Rule("adagrad", adagrad, adagrad_coefficients, slots=("v",), slot_meanings={"v": "sum of squared gradients"})
