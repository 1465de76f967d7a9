"""Stochastic gradient descent with momentum, dampening, Nesterov and coupled weight decay.

    g <- g + wd * p                        (if wd != 0)
    v <- mu * v + (1 - tau) * g            (if mu > 0)
    d <- g + mu * v if nesterov else v     (d = g without momentum)
    p <- p - lr * d

As in MLX the buffer starts at zero and dampening applies from the first step.
"""

from treeopt.rules.base import Rule, active


def sgd_coefficients(lr, step, *, momentum, weight_decay, dampening, nesterov):
    return dict(
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        one_minus_dampening=1 - dampening,
        decays=active(weight_decay),
        uses_momentum=active(momentum, lambda m: m > 0),
        dampens=active(dampening, lambda d: d > 0),
        nesterov=nesterov,
    )


def sgd(grad, param, v, lr, momentum, weight_decay, one_minus_dampening, decays, uses_momentum, dampens, nesterov):
    if decays:
        grad = grad + weight_decay * param
    if not uses_momentum:
        return param - lr * grad, v
    v = momentum * v
    v = v + (one_minus_dampening * grad if dampens else grad)
    direction = grad + momentum * v if nesterov else v
    return param - lr * direction, v


SGD = Rule("sgd", sgd, sgd_coefficients, slots=("v",), slot_meanings={"v": "momentum buffer"})
