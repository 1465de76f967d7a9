"""Muon: momentum orthogonalised by Newton-Schulz iterations.

    g <- g + wd * p                                 (coupled decay, as in MLX)
    v <- mu * v + (1 - mu) * g
    d  = (1 - mu) * g + mu * v if nesterov else v
    for matrices (ndim >= 2; more dims are flattened to (shape[0], -1)):
        d  = NewtonSchulz5(d)
        lr = lr * sqrt(max(1, shape[-2] / shape[-1]))   (on the original shape)
    p <- p - lr * d

NewtonSchulz5 makes d's singular values close to 1: with X = d / (|d|_F + 1e-7), taken
wide (transposed when rows > columns), repeat ``ns_steps`` times
    A = X X^T;  B = b A + c A A;  X = a X + B X
with (a, b, c) = (3.4445, -4.7750, 2.0315). Tensors with ndim < 2 get the momentum step
only; route them to AdamW with MultiOptimizer.
"""

from math import sqrt as py_sqrt

from treeopt.ops import addmm, astype, cast, dtype_name, matmul, sqrt, swap_last, total
from treeopt.rules.base import Rule, active

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def muon_coefficients(lr, step, *, momentum, weight_decay, nesterov, ns_steps, ns_dtype):
    return dict(lr=lr, momentum=momentum, one_minus_momentum=1 - momentum,
                weight_decay=weight_decay, decays=active(weight_decay), nesterov=nesterov,
                ns_steps=ns_steps, ns_dtype=ns_dtype)


def newton_schulz(x, steps):
    """Approximately orthogonalise the matrix ``x`` (its nearest semi-orthogonal matrix)."""
    a, b, c = NS_COEFFICIENTS
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = swap_last(x)
    x = x / (sqrt(total(x * x)) + cast(1e-7, x))
    for _ in range(steps):
        gram = matmul(x, swap_last(x))
        # X <- a X + (b A + c A A) X: two GEMMs, each product accumulated and rounded once
        x = addmm(x, addmm(gram, gram, gram, alpha=c, beta=b), x, beta=a)
    return swap_last(x) if tall else x


def muon_direction(grad, param, v, momentum, one_minus_momentum, weight_decay, decays, nesterov, **_):
    """The elementwise part: decay and momentum, on a whole tensor or on any rows of it."""
    if decays:
        grad = grad + weight_decay * param
    v = momentum * v + one_minus_momentum * grad
    return (grad * one_minus_momentum + v * momentum if nesterov else v), v


def muon_orthogonalize(direction, lr, ns_steps, ns_dtype, **_):
    """The full-matrix part: Newton-Schulz on the whole matrix and the shape's lr factor.
    Sharded parameters gather each matrix to one rank for it (treeopt.distributed)."""
    if direction.ndim < 2:
        return direction, lr
    shape = tuple(direction.shape)
    matrix = direction.reshape((shape[0], -1)) if len(shape) > 2 else direction
    if ns_dtype is None:
        orthogonal = newton_schulz(matrix, ns_steps)
    else:  # opt-in: iterate in a lower precision (bfloat16 in the reference), then come back
        orthogonal = astype(newton_schulz(astype(matrix, ns_dtype), ns_steps), dtype_name(matrix))
    return orthogonal.reshape(shape), scaled_lr(lr, shape)


def scaled_lr(lr, shape):
    """The learning rate of a matrix of ``shape``: ``sqrt(rows / columns)`` times larger when tall."""
    return lr * cast(py_sqrt(max(1.0, shape[-2] / shape[-1])), lr)


def muon(grad, param, v, lr, momentum, one_minus_momentum, weight_decay, decays, nesterov, ns_steps, ns_dtype):
    direction, v = muon_direction(grad, param, v, momentum, one_minus_momentum, weight_decay, decays, nesterov)
    direction, lr = muon_orthogonalize(direction, lr, ns_steps, ns_dtype)
    return param - lr * direction, v


MUON = Rule("muon", muon, muon_coefficients, slots=("v",), elementwise=False,
            slot_meanings={"v": "average of gradients"})
