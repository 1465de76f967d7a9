"""Adam, AdamW and Adamax.

Adam:
    m <- b1 * m + (1 - b1) * g
    v <- b2 * v + (1 - b2) * g^2
    p <- p - c1 * m / (sqrt(v) * c2 + eps)
with c1 = lr / (1 - b1^t) and c2 = 1 / sqrt(1 - b2^t) under bias correction, else c1 = lr
and c2 = 1 (MLX's default: no bias correction).

AdamW decays the parameter first, p <- p * (1 - lr * wd), with the raw learning rate.

Adamax:
    m <- b1 * m + (1 - b1) * g
    v <- max(b2 * v, |g|)
    p <- p - lr * m / (v + eps)
"""

from treeopt.ops import maximum, rsqrt, sqrt
from treeopt.rules.base import Rule


def adam_coefficients(lr, step, *, betas, eps, bias_correction):
    b1, b2 = betas
    if bias_correction:
        c1, c2 = lr / (1 - b1**step), rsqrt(1 - b2**step)
    else:
        c1, c2 = lr, 1.0
    return dict(b1=b1, one_minus_b1=1 - b1, b2=b2, one_minus_b2=1 - b2, c1=c1, c2=c2, eps=eps)


def adam(grad, param, m, v, b1, one_minus_b1, b2, one_minus_b2, c1, c2, eps):
    m = b1 * m + one_minus_b1 * grad
    v = b2 * v + one_minus_b2 * (grad * grad)
    return param - c1 * m / (sqrt(v) * c2 + eps), m, v


def adamw_coefficients(lr, step, *, betas, eps, bias_correction, weight_decay):
    return dict(
        adam_coefficients(lr, step, betas=betas, eps=eps, bias_correction=bias_correction), decay=1 - lr * weight_decay
    )


def adamw(grad, param, m, v, b1, one_minus_b1, b2, one_minus_b2, c1, c2, eps, decay):
    return adam(grad, param * decay, m, v, b1, one_minus_b1, b2, one_minus_b2, c1, c2, eps)


def adamax_coefficients(lr, step, *, betas, eps):
    b1, b2 = betas
    return dict(lr=lr, b1=b1, one_minus_b1=1 - b1, b2=b2, eps=eps)


def adamax(grad, param, m, v, lr, b1, one_minus_b1, b2, eps):
    m = b1 * m + one_minus_b1 * grad
    v = maximum(b2 * v, abs(grad))
    return param - lr * m / (v + eps), m, v


_MOMENTS = {"m": "average of gradients", "v": "average of squared gradients"}
ADAM = Rule("adam", adam, adam_coefficients, slots=("m", "v"), slot_meanings=_MOMENTS)
ADAMW = Rule("adamw", adamw, adamw_coefficients, slots=("m", "v"), slot_meanings=_MOMENTS)
ADAMAX = Rule(
    "adamax",
    adamax,
    adamax_coefficients,
    slots=("m", "v"),
    slot_meanings={"m": "average of gradients", "v": "infinity norm of gradients"},
)
