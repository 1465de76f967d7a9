"""RMSprop: divide by a running root mean square of the gradient.

v <- alpha * v + (1 - alpha) * g^2
p <- p - lr * g / (sqrt(v) + eps)
"""

from treeopt.ops import sqrt
from treeopt.rules.base import Rule


def rmsprop_coefficients(lr, step, *, alpha, eps):
    return dict(lr=lr, alpha=alpha, one_minus_alpha=1 - alpha, eps=eps)


def rmsprop(grad, param, v, lr, alpha, one_minus_alpha, eps):
    v = alpha * v + one_minus_alpha * (grad * grad)
    return param - lr * grad / (sqrt(v) + eps), v


RMSPROP = Rule(
    "rmsprop", rmsprop, rmsprop_coefficients, slots=("v",), slot_meanings={"v": "average of squared gradients"}
)
