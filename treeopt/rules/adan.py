"""Adan (Xie et al., 2022): adaptive Nesterov momentum, estimated from gradient differences.

With d = g - g_prev (0 at the first step), t the step and b1, b2, b3 the decays of the
averages (0.98, 0.92, 0.99 by default, as in the paper's code and optax):

    m <- (1 - b1) g + b1 m
    v <- (1 - b2) d + b2 v
    n <- (1 - b3) (g + (1 - b2) d)^2 + b3 n
    u  = (m / (1 - b1^t) + (1 - b2) v / (1 - b2^t)) / (sqrt(n / (1 - b3^t) + eps_root) + eps)
    p <- p - lr (u + wd p)

The weight decay is added to the update, as optax's ``adan`` does; the order of every
operation is optax's, so float32 results agree with it to rounding.
"""

from treeopt.ops import minimum, sqrt
from treeopt.rules.base import Rule


def adan_coefficients(lr, step, *, betas, eps, eps_root, weight_decay):
    b1, b2, b3 = betas
    return dict(
        lr=lr,
        b1=b1,
        one_minus_b1=1 - b1,
        b2=b2,
        one_minus_b2=1 - b2,
        b3=b3,
        one_minus_b3=1 - b3,
        c1=1 - b1**step,
        c2=1 - b2**step,
        c3=1 - b3**step,
        eps=eps,
        eps_root=eps_root,
        weight_decay=weight_decay,
        started=minimum(1.0, step - 1),
    )


def adan(
    grad,
    param,
    m,
    v,
    n,
    prev_grad,
    lr,
    b1,
    one_minus_b1,
    b2,
    one_minus_b2,
    b3,
    one_minus_b3,
    c1,
    c2,
    c3,
    eps,
    eps_root,
    weight_decay,
    started,
):
    diff = (grad - prev_grad) * started  # no difference at the first step
    m = one_minus_b1 * grad + b1 * m
    v = one_minus_b2 * diff + b2 * v
    s = grad + one_minus_b2 * diff
    n = one_minus_b3 * (s * s) + b3 * n
    u = (m / c1 + one_minus_b2 * (v / c2)) / (sqrt(n / c3 + eps_root) + eps)
    return param - lr * (u + weight_decay * param), m, v, n, grad


ADAN = Rule(
    "adan",
    adan,
    adan_coefficients,
    slots=("m", "v", "n", "prev_grad"),
    slot_meanings={
        "m": "average of gradients",
        "v": "average of gradient differences",
        "n": "average of squared Nesterov gradients",
        "prev_grad": "previous gradient",
    },
)
