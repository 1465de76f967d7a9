"""AdaDelta: step sizes from running averages of squared gradients and squared updates.

v <- rho * v + (1 - rho) * g^2
d  = sqrt(u + eps) / sqrt(v + eps) * g
u <- rho * u + (1 - rho) * d^2
p <- p - lr * d
"""

from treeopt.ops import sqrt
from treeopt.rules.base import Rule


def adadelta_coefficients(lr, step, *, rho, eps):
    return dict(lr=lr, rho=rho, one_minus_rho=1 - rho, eps=eps)


def adadelta(grad, param, v, u, lr, rho, one_minus_rho, eps):
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
