"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

c  = b1 * m + (1 - b1) * g
m <- b2 * m + (1 - b2) * g
p <- p * (1 - lr * wd)        (if wd > 0)
p <- p - lr * sign(c)
"""

from treeopt.ops import sign
from treeopt.rules.base import Rule, active


def lion_coefficients(lr, step, *, betas, weight_decay):
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


def lion(grad, param, m, lr, b1, one_minus_b1, b2, one_minus_b2, decay, decays):
    c = b1 * m + one_minus_b1 * grad
    m = b2 * m + one_minus_b2 * grad
    if decays:
        param = decay * param
    return param - lr * sign(c), m


LION = Rule("lion", lion, lion_coefficients, slots=("m",), slot_meanings={"m": "average of gradients"})
