"""Muon: momentum orthogonalised by Newton-Schulz iterations.

    g <- g + wd * p                                 (coupled decay, as in MLX; the default)
    v <- mu * v + (1 - mu) * g
    d  = (1 - mu) * g + mu * v if nesterov else v
    for matrices (ndim >= 2), viewed as 2-D by their layout:
        "out_in" (MLX, torch: (out, in, *kernel)) -> (out, in * kernel), as Keller Jordan's
        "in_out" (flax: (*kernel, in, out))       -> (kernel * in, out),  as optax
        d  = NewtonSchulz5(d)
        s  = sqrt(max(1, shape[-2] / shape[-1]))        "original", "out_in": as MLX and Keller Jordan
          or sqrt(max(1, fan_out / fan_in))             "original", "in_out": as optax
          or 0.2 * sqrt(max(rows, cols))                "match_rms_adamw": of the 2-D view
    p <- p * (1 - lr * wd)                          (decoupled decay, when chosen instead)
    p <- p - lr * s * d

NewtonSchulz5 makes d's singular values close to 1: with X = d / (|d|_F + eps), taken
wide (transposed when rows > columns), repeat ``ns_steps`` times
    A = X X^T;  B = b A + c A A;  X = a X + B X
with (a, b, c) = (3.4445, -4.7750, 2.0315) and eps = 1e-7 (MLX's and Keller Jordan's).
Tensors with ndim < 2 get the momentum step (and the decay) only; route them to AdamW with
MultiOptimizer.

Runners may stack same-shape tensors: ``muon(..., stacked=True)`` takes arrays whose first
axis indexes the tensors, and Newton-Schulz orthogonalises every matrix of the stack at once
(batched matrix products; each matrix has its own norm).

The match-RMS scale (Liu et al., "Muon is Scalable for LLM Training", 2025) gives the update
the root-mean-square of a typical AdamW update (about 0.2), so one learning rate serves both.
"""

from math import prod, sqrt as py_sqrt

from treeopt.ops import addmm, astype, cast, dtype_name, matmul, on_whole, sqrt, swap_last, total
from treeopt.rules.base import Parts, Rule, active

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
#: how the learning rate of a matrix is scaled by its shape
ADJUST_LR = ("original", "match_rms_adamw")
#: the root-mean-square of an AdamW update that "match_rms_adamw" matches
ADAMW_RMS = 0.2
#: where a weight keeps its output axis: first ("out_in") or last ("in_out")
LAYOUTS = ("out_in", "in_out")


def muon_coefficients(
    lr, step, *, momentum, weight_decay, decoupled_weight_decay, nesterov, ns_steps, ns_dtype, ns_eps, adjust_lr, layout
):
    decays = active(weight_decay)
    decoupled = decays and decoupled_weight_decay
    return dict(
        lr=lr,
        momentum=momentum,
        one_minus_momentum=1 - momentum,
        weight_decay=weight_decay,
        coupled=decays and not decoupled,
        keep=1 - lr * weight_decay if decoupled else None,
        nesterov=nesterov,
        ns_steps=ns_steps,
        ns_dtype=ns_dtype,
        ns_eps=ns_eps,
        adjust_lr=adjust_lr,
        layout=layout,
    )


def matrix_shape(shape, layout):
    """The 2-D view Newton-Schulz orthogonalises: the output axis against all the others."""
    if layout == "in_out":
        return prod(shape[:-1]), shape[-1]
    return shape[0], prod(shape[1:])


def lr_scale(shape, layout, adjust_lr):
    """The factor of the learning rate of a weight of this (stored) shape."""
    rows, columns = matrix_shape(shape, layout)
    if adjust_lr == "match_rms_adamw":
        return ADAMW_RMS * py_sqrt(max(rows, columns))
    if layout == "in_out":
        return py_sqrt(max(1.0, columns / rows))
    return py_sqrt(max(1.0, shape[-2] / shape[-1]))  # for a conv kernel: kh / kw, as the references


def newton_schulz(x, steps, eps=NS_EPS):
    """Approximately orthogonalise the matrix ``x`` (its nearest semi-orthogonal matrix), or
    each matrix of a stack (the last two axes; leading axes index the matrices)."""
    a, b, c = NS_COEFFICIENTS
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = swap_last(x)
    x = x / (sqrt(total(x * x, axis=(-2, -1), keepdims=True)) + cast(eps, x))
    for _ in range(steps):
        gram = matmul(x, swap_last(x))
        # X <- a X + (b A + c A A) X: two GEMMs, each product accumulated and rounded once
        x = addmm(x, addmm(gram, gram, gram, alpha=c, beta=b), x, beta=a)
    return swap_last(x) if tall else x


def muon_direction(grad, param, v, momentum, one_minus_momentum, weight_decay, coupled, nesterov, **_):
    """The elementwise part: coupled decay and momentum, on a whole tensor or on any rows of it."""
    if coupled:
        grad = grad + weight_decay * param
    v = momentum * v + one_minus_momentum * grad
    return (grad * one_minus_momentum + v * momentum if nesterov else v), v


def muon_orthogonalize(direction, ns_steps, ns_dtype, ns_eps, layout, stack=0, **_):
    """The full-matrix part: Newton-Schulz on the whole matrix (each matrix of a stack when
    the first ``stack`` axes index one)."""
    if direction.ndim - stack < 2:
        return direction
    # a matrix split across devices is orthogonalised whole, then split back as it was
    return on_whole(lambda d: orthogonalise(d, ns_steps, ns_eps, ns_dtype, layout, stack), direction)


def scaled_lr(lr, shape, layout, adjust_lr):
    """The learning rate of a matrix of ``shape`` (see :func:`lr_scale`)."""
    return lr * cast(lr_scale(shape, layout, adjust_lr), lr)


def muon_apply(param, direction, shape, lr, keep, adjust_lr, layout, **_):
    """The last, elementwise part: decoupled decay (by the unscaled learning rate, as the
    references do) and the step, by the learning rate for a whole tensor's ``shape``."""
    if len(shape) >= 2:
        lr = scaled_lr(lr, shape, layout, adjust_lr)
    if keep is not None:
        param = param * keep
    return param - lr * direction


def muon(
    grad,
    param,
    v,
    lr,
    momentum,
    one_minus_momentum,
    weight_decay,
    coupled,
    keep,
    nesterov,
    ns_steps,
    ns_dtype,
    ns_eps,
    adjust_lr,
    layout,
    stacked=False,
):
    direction, v = muon_direction(grad, param, v, momentum, one_minus_momentum, weight_decay, coupled, nesterov)
    direction = muon_orthogonalize(direction, ns_steps, ns_dtype, ns_eps, layout, int(stacked))
    shape = tuple(param.shape[int(stacked) :])  # one tensor's
    return muon_apply(param, direction, shape, lr, keep, adjust_lr, layout), v


def orthogonalise(direction, ns_steps, ns_eps, ns_dtype, layout, stack=0):
    """Newton-Schulz on ``direction`` viewed as a matrix by its ``layout``, in its own shape
    (of each of its matrices when its first ``stack`` axes index a stack)."""
    lead, shape = tuple(direction.shape[:stack]), tuple(direction.shape[stack:])
    matrix = direction.reshape(lead + matrix_shape(shape, layout)) if len(shape) > 2 else direction
    if ns_dtype is None:
        orthogonal = newton_schulz(matrix, ns_steps, ns_eps)
    else:  # opt-in: iterate in a lower precision (bfloat16 in the reference), then come back
        orthogonal = astype(newton_schulz(astype(matrix, ns_dtype), ns_steps, ns_eps), dtype_name(matrix))
    return orthogonal.reshape(lead + shape)


MUON = Rule(
    "muon",
    muon,
    muon_coefficients,
    slots=("v",),
    elementwise=False,
    stackable=True,
    slot_meanings={"v": "average of gradients"},
    parts=Parts(muon_direction, muon_orthogonalize, muon_apply),
)
