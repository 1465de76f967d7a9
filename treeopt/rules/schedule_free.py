"""Schedule-free AdamW (Defazio et al., 2024, "The Road Less Scheduled").

The parameter is y, the point where gradients are taken. The state keeps z, the base
sequence (it starts at the parameter), and v, Adam's second moment; the average x, where the
model is evaluated, is recovered from the two. With t the step and lr the learning rate:

    running values, once per step:
        lr_max <- max(lr_max, lr);  w_sum <- w_sum + lr_max^weight_lr_power
        c = lr_max^weight_lr_power / w_sum
    v  <- (1 - b2) g^2 + b2 v
    u   = g / (sqrt(v / (1 - b2^t)) + eps) + wd y
    z' = z - lr u
    x   = (y - (1 - b1) z) / b1
    x' = (1 - c) x + c z'
    y' = b1 x' + (1 - b1) z'

The order of every operation is optax's ``contrib.schedule_free_adamw``, so float32 results
agree with it to rounding.
"""

from treeopt.ops import maximum, sqrt
from treeopt.rules.base import Rule


def schedule_free_advance(lr, step, *, max_lr, weight_sum, weight_lr_power):
    max_lr = maximum(max_lr, lr)
    return dict(max_lr=max_lr, weight_sum=weight_sum + max_lr**weight_lr_power)


def schedule_free_adamw_coefficients(lr, step, *, betas, eps, weight_decay, weight_lr_power, max_lr, weight_sum):
    b1, b2 = betas
    # the weight of this step's point in the average (0 while the learning rate is 0)
    c = max_lr**weight_lr_power / maximum(weight_sum, 1e-38)
    return dict(
        lr=lr,
        b1=b1,
        one_minus_b1=1 - b1,
        b2=b2,
        one_minus_b2=1 - b2,
        c2=1 - b2**step,
        eps=eps,
        weight_decay=weight_decay,
        c=c,
        one_minus_c=1 - c,
        one=1.0,
    )


def schedule_free_adamw(
    grad, param, z, v, lr, b1, one_minus_b1, b2, one_minus_b2, c2, eps, weight_decay, c, one_minus_c, one
):
    v = one_minus_b2 * (grad * grad) + b2 * v
    u = one / (sqrt(v / c2) + eps) * grad + weight_decay * param
    new_z = z - lr * u
    x = (param - one_minus_b1 * z) / b1
    x = one_minus_c * x + c * new_z
    return b1 * x + one_minus_b1 * new_z, new_z, v


SCHEDULE_FREE_ADAMW = Rule(
    "schedule_free_adamw",
    schedule_free_adamw,
    schedule_free_adamw_coefficients,
    slots=("z", "v"),
    copies_param=("z",),
    running=("max_lr", "weight_sum"),
    advance=schedule_free_advance,
    slot_meanings={"z": "schedule-free base sequence", "v": "average of squared gradients"},
)
