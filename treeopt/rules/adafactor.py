"""Adafactor: second moments kept as row and column averages for matrices.

With RMS(x) = sqrt(mean(x^2)) and t the step:

    rho    = min(1e-2 or 1e-6 t under warm-up, 1/sqrt(t))  if relative_step, else lr
    alpha  = max(eps2, RMS(p)) * rho                        (rho alone without scale_parameter)
    b2     = 1 - t^decay_rate
    u      = g^2 + eps1
    matrices (ndim >= 2), over the last two axes:
        R <- b2 R + (1 - b2) mean(u, -1);  C <- b2 C + (1 - b2) mean(u, -2)
        u  = rsqrt(R / mean(R, -1)) (outer) rsqrt(C) * g
    otherwise:
        S <- b2 S + (1 - b2) u;  u = rsqrt(S) * g
    u  = alpha * u / max(1, RMS(u) / clip_threshold)
    E <- b1 E + (1 - b1) u;  u = E                          (if beta_1 is not None)
    p <- p + p * (-wd * alpha)                              (if wd != 0)
    p <- p - u
"""

from treeopt.ops import maximum, mean, minimum, rsqrt, sqrt
from treeopt.rules.base import Rule, active


def adafactor_slots(shape, hyper):
    """The slots and their shapes: row and column averages for a matrix (or a batch of
    them), else the full second moment; the first moment only with ``beta_1``."""
    if len(shape) >= 2:
        slots = {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
    else:
        slots = {"exp_avg_sq": shape}
    if hyper["beta_1"] is not None:
        slots["exp_avg"] = shape
    return slots


def adafactor_coefficients(
    lr, step, *, eps, clip_threshold, decay_rate, beta_1, weight_decay, scale_parameter, relative_step, warmup_init
):
    if relative_step:
        rho = minimum(1e-6 * step if warmup_init else 1e-2, rsqrt(step))
    else:
        rho = lr
    has_first_moment = beta_1 is not None
    return dict(
        rho=rho,
        eps1=eps[0],
        eps2=eps[1],
        one=1.0,
        clip_threshold=clip_threshold,
        step_decay=step**decay_rate,
        beta_1=beta_1 if has_first_moment else 0.0,
        one_minus_beta_1=1 - beta_1 if has_first_moment else 0.0,
        neg_weight_decay=-weight_decay,
        decays=active(weight_decay),
        scale_parameter=scale_parameter,
    )


def rms(x):
    return sqrt(mean(x * x))


def factored_rsqrt(row, col):
    """The inverse square root of the second moment that the row and column averages stand
    for: rsqrt(R / mean(R)) (outer) rsqrt(C), over the last two axes."""
    return rsqrt(row / mean(row, axis=-1, keepdims=True))[..., None] * rsqrt(col)[..., None, :]


def adafactor(
    grad,
    param,
    *slots,
    rho,
    eps1,
    eps2,
    one,
    clip_threshold,
    step_decay,
    beta_1,
    one_minus_beta_1,
    neg_weight_decay,
    decays,
    scale_parameter,
):
    alpha = maximum(eps2, rms(param)) * rho if scale_parameter else rho
    beta_2 = one - step_decay
    one_minus_beta_2 = one - beta_2
    update = grad * grad + eps1
    if grad.ndim >= 2:
        row, col, *first_moment = slots
        row = beta_2 * row + one_minus_beta_2 * mean(update, axis=-1)
        col = beta_2 * col + one_minus_beta_2 * mean(update, axis=-2)
        update = factored_rsqrt(row, col) * grad
        second_moment: tuple = (row, col)
    else:
        square, *first_moment = slots
        square = beta_2 * square + one_minus_beta_2 * update
        update = rsqrt(square) * grad
        second_moment = (square,)
    update = alpha * (update / maximum(one, rms(update) / clip_threshold))
    if first_moment:
        update = beta_1 * first_moment[0] + one_minus_beta_1 * update
        first_moment = [update]
    if decays:
        param = param + param * (neg_weight_decay * alpha)
    return (param - update, *second_moment, *first_moment)


ADAFACTOR = Rule(
    "adafactor",
    adafactor,
    adafactor_coefficients,
    slots=adafactor_slots,
    elementwise=False,
    slot_meanings={"exp_avg": "average of updates", "exp_avg_sq": "average of squared gradients"},
)
