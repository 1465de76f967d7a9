"""Muon: momentum orthogonalised by Newton-Schulz iterations, with the variants the field runs.

    g <- g + wd * p                                   (coupled decay, as in MLX; the default)
    v <- mu * v + (1 - mu) * g
    d  = (1 - mu) * g + mu * v if nesterov else v
    for matrices (ndim >= 2 after ``batch_axes``), D = d viewed as (out, in) by its layout:
        "out_in" (MLX, torch: (out, in, *kernel)) -> (out, in * kernel), as Keller Jordan's
        "in_out" (flax: (*kernel, in, out))       -> (kernel * in, out), as optax (its outputs
                                                     are the columns; below, rows are outputs)
        leading ``batch_axes`` index separate matrices (experts); ``num_heads`` or
        ``split_sizes`` cut the output axis into blocks, each a matrix of its own (as dion)
        D  = D_i * (|D|_F / sqrt(out)) / max(|D_i|, 1e-6)  for every row i   row_equilibration (MuonEq)
        O  = NewtonSchulz(D)
        O  = O * sqrt(min(out, in)) / max(|O|_F, 1e-6)                   renormalization (Muon+)
        normuon, for every neuron n (a row: an output; "larger": a row or a column, whichever
        side is longer, as modded-nanogpt and nanochat):
            s_n <- b2 * s_n + (1 - b2) * mean(O_n^2);   U_n = O_n / (sqrt(s_n) + 1e-10)
            O  = U * |O|_F / |U|_F                   (NorMuon keeps the update's norm)
        s  = sqrt(max(1, shape[-2] / shape[-1]))        "original", "out_in": as MLX and Keller Jordan
          or sqrt(max(1, fan_out / fan_in))             "original", "in_out": as optax
          or 0.2 * sqrt(max(rows, cols))                "match_rms_adamw": of the 2-D view
        (of each block's own 2-D shape when the output axis is cut into blocks)
    p <- p * (1 - lr * wd)                          (decoupled decay, when chosen instead)
      or p <- p * (1 - lr * wd) where O * p >= 0    (cautious: only where they agree in sign)
    p <- p - lr * s * O

NewtonSchulz makes D's singular values close to 1: with X = D / (|D|_F * safety + eps),
taken wide (transposed when rows > columns), for k = 1 .. ``ns_steps``
    A = X X^T;  B = b_k A + c_k A A;  X = a_k X + B X
with (a_k, b_k, c_k) from the table ``ns_coefficients`` (its last triple repeats past its end):
    "keller2024":    (3.4445, -4.7750, 2.0315) every step, safety 1 (Keller Jordan, MLX)
    "polar_express": five triples (Amsel et al., 2025, for 5 steps, safety factor 2e-2,
                     cushion 0.02, lower bound 1e-3), safety 1.02 (dion, modded-nanogpt)
and eps = ``ns_eps`` (1e-7 by default). Tensors with ndim < 2 get the momentum step (and the
decay) only; route them to AdamW with MultiOptimizer.

Runners may stack same-shape tensors: ``muon(..., stacked=True)`` takes arrays whose first
axis indexes the tensors, and Newton-Schulz orthogonalises every matrix of the stack at once
(batched matrix products; each matrix has its own norm).

The match-RMS scale (Liu et al., "Muon is Scalable for LLM Training", 2025) gives the update
the root-mean-square of a typical AdamW update (about 0.2), so one learning rate serves both.
References of the variants: Polar Express, arXiv 2505.16932; NorMuon, arXiv 2510.05491;
MuonEq, arXiv 2603.28254; Muon+, arXiv 2602.21545; cautious weight decay, arXiv 2510.12402.
"""

from math import prod, sqrt as py_sqrt

from treeopt.ops import (
    addmm,
    astype,
    cast,
    concatenate,
    dtype_name,
    matmul,
    maximum,
    mean,
    on_whole,
    sign,
    sqrt,
    swap_last,
    total,
    where,
)
from treeopt.rules.base import Parts, Rule, active

#: Newton-Schulz coefficient tables, (a, b, c) per iteration, the last repeated past the end
NS_TABLES = {
    "keller2024": ((3.4445, -4.7750, 2.0315),),
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}
#: the margin each table's normalisation takes on the Frobenius norm
NS_SAFETY = {"keller2024": 1.0, "polar_express": 1.02}
NS_COEFFICIENTS = NS_TABLES["keller2024"][0]
NS_EPS = 1e-7
#: how the learning rate of a matrix is scaled by its shape
ADJUST_LR = ("original", "match_rms_adamw")
#: the root-mean-square of an AdamW update that "match_rms_adamw" matches
ADAMW_RMS = 0.2
#: where a weight keeps its output axis: first ("out_in") or last ("in_out")
LAYOUTS = ("out_in", "in_out")
#: NorMuon's neurons: the outputs (rows), or the longer side of each matrix
NORMUON = ("output", "larger")
#: the floors of the row norms (MuonEq), of the update's norm (Muon+) and of NorMuon's root
EQUILIBRATION_EPS, RENORMALIZATION_EPS, NORMUON_EPS = 1e-6, 1e-6, 1e-10


def muon_slots(shape, hyper):
    """The momentum ``v``; with NorMuon, a matrix also keeps ``second_moment``, one value per
    neuron (per output, or per row or column of the longer side), behind its batch axes."""
    slots = {"v": shape}
    batch, normuon = hyper.get("batch_axes", 0), hyper.get("normuon")
    if len(shape) - batch < 2:
        return slots
    out, inner = oriented_shape(shape[batch:], hyper.get("layout", "out_in"))
    # blocks that do not fit are refused here, before any change
    blocks(out, hyper.get("num_heads"), hyper.get("split_sizes"), shape)
    if normuon:
        longer = normuon == "larger" and inner > out
        slots["second_moment"] = tuple(shape[:batch]) + (inner if longer else out,)
    return slots


def muon_coefficients(
    lr,
    step,
    *,
    momentum,
    weight_decay,
    decoupled_weight_decay,
    nesterov,
    ns_steps,
    ns_dtype,
    ns_eps,
    adjust_lr,
    layout,
    cautious_weight_decay=False,
    ns_coefficients="keller2024",
    ns_safety=None,
    row_equilibration=False,
    renormalization=False,
    normuon=None,
    normuon_beta2=0.95,
    batch_axes=0,
    num_heads=None,
    split_sizes=None,
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
        cautious=bool(decoupled and cautious_weight_decay),
        one=1.0,
        nesterov=nesterov,
        ns_steps=ns_steps,
        ns_dtype=ns_dtype,
        ns_eps=ns_eps,
        ns_coefficients=ns_coefficients,
        ns_safety=NS_SAFETY[ns_coefficients] if ns_safety is None else ns_safety,
        row_equilibration=row_equilibration,
        renormalization=renormalization,
        normuon=normuon,
        normuon_beta2=normuon_beta2,
        one_minus_normuon_beta2=1 - normuon_beta2,
        adjust_lr=adjust_lr,
        layout=layout,
        batch_axes=batch_axes,
        num_heads=num_heads,
        # block sizes are structure, not numbers: they reach the update as text ("128,32,32")
        split_sizes=None if split_sizes is None else ",".join(map(str, split_sizes)),
    )


def matrix_shape(shape, layout):
    """The 2-D view Newton-Schulz orthogonalises: the output axis against all the others."""
    if layout == "in_out":
        return prod(shape[:-1]), shape[-1]
    return shape[0], prod(shape[1:])


def oriented_shape(shape, layout):
    """``(outputs, inputs)`` of a weight of this (stored) shape."""
    rows, columns = matrix_shape(shape, layout)
    return (columns, rows) if layout == "in_out" else (rows, columns)


def blocks(out, num_heads, split_sizes, shape=None):
    """The ``(start, stop)`` of each block of the output axis (``None``: one block). Raises
    ValueError when they do not fit a weight of ``out`` outputs."""
    if isinstance(split_sizes, str):
        split_sizes = tuple(int(s) for s in split_sizes.split(","))
    where_ = f" of a weight of shape {tuple(shape)}" if shape is not None else ""
    if num_heads is not None and num_heads > 1:
        if out % num_heads:
            raise ValueError(f"Muon num_heads={num_heads} does not divide the {out} outputs{where_}")
        size = out // num_heads
        return [(h * size, (h + 1) * size) for h in range(num_heads)]
    if split_sizes is not None:
        if sum(split_sizes) != out:
            raise ValueError(f"Muon split_sizes={tuple(split_sizes)} do not sum to the {out} outputs{where_}")
        starts = [sum(split_sizes[:i]) for i in range(len(split_sizes))]
        return [(a, a + n) for a, n in zip(starts, split_sizes)]
    return None


def lr_scale(shape, layout, adjust_lr):
    """The factor of the learning rate of a weight of this (stored) shape."""
    rows, columns = matrix_shape(shape, layout)
    if adjust_lr == "match_rms_adamw":
        return ADAMW_RMS * py_sqrt(max(rows, columns))
    if layout == "in_out":
        return py_sqrt(max(1.0, columns / rows))
    return py_sqrt(max(1.0, shape[-2] / shape[-1]))  # for a conv kernel: kh / kw, as the references


def newton_schulz(x, steps, eps=NS_EPS, table="keller2024", safety=1.0, normalized=False):
    """Approximately orthogonalise the matrix ``x`` (its nearest semi-orthogonal matrix), or
    each matrix of a stack (the last two axes; leading axes index the matrices).
    ``normalized``: ``x`` is already divided by ``safety * |x|_F + eps`` (:func:`equilibrate`)."""
    lead = tuple(x.shape[:-2])
    if len(lead) > 1:  # one stack axis: batched products take three dimensions
        x = x.reshape((prod(lead),) + tuple(x.shape[-2:]))
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = swap_last(x)
    if not normalized:
        # times 1 (Keller Jordan's table) is exact: one expression for every table, no branch on
        # a value that a runner may hold on the device
        x = x / (sqrt(total(x * x, axis=(-2, -1), keepdims=True)) * cast(safety, x) + cast(eps, x))
    coefficients = NS_TABLES[table]
    for k in range(steps):
        a, b, c = coefficients[min(k, len(coefficients) - 1)]
        gram = matmul(x, swap_last(x))
        # X <- a X + (b A + c A A) X: two GEMMs, each product accumulated and rounded once
        x = addmm(x, addmm(gram, gram, gram, alpha=c, beta=b), x, beta=a)
    x = swap_last(x) if tall else x
    return x.reshape(lead + tuple(x.shape[-2:])) if len(lead) > 1 else x


def equilibrate(x, out_axis=-2, safety=None, eps=NS_EPS):
    """MuonEq: every output neuron of ``x`` (a row, or with ``out_axis=-1`` a column; each
    matrix of a stack) scaled to the neurons' mean norm. With ``safety``, the result is also
    divided by ``safety * |result|_F + eps``, as Newton-Schulz starts: both scales come from
    the neurons' squared norms, so ``x`` is read once squared and once scaled."""
    squares = total(x * x, axis=-1 if out_axis == -2 else -2, keepdims=True)  # one per neuron
    target = sqrt(total(squares, axis=(-2, -1), keepdims=True) * cast(1 / x.shape[out_axis], x))
    scale = target / maximum(sqrt(squares), cast(EQUILIBRATION_EPS, x))
    if safety is not None:  # |x * scale|_F from the neurons' squares
        norm = sqrt(total(squares * scale * scale, axis=(-2, -1), keepdims=True))
        scale = scale / (norm * cast(safety, x) + cast(eps, x))
    return x * scale


def renormalize(x):
    """Muon+: ``x`` (each matrix of a stack) scaled to the Frobenius norm of a semi-orthogonal
    matrix of its shape, sqrt(min(rows, columns))."""
    norm = sqrt(total(x * x, axis=(-2, -1), keepdims=True))
    return x * (cast(py_sqrt(min(x.shape[-2:])), x) / maximum(norm, cast(RENORMALIZATION_EPS, x)))


def normuon_normalize(
    o, second_moment, normuon, normuon_beta2, one_minus_normuon_beta2, one, out_axis=-2, renormalization=False
):
    """NorMuon on ``o`` (each matrix of a stack; its outputs the rows, or with ``out_axis=-1``
    the columns): every neuron divided by the root of its running mean square, then the whole
    scaled back to ``o``'s norm; with ``renormalization``, on Muon+'s :func:`renormalize` of
    ``o``. Every norm comes from the neurons' mean squares (|o|^2 is their sum times the
    neuron's length, |U|^2 the same over the divided ones; Muon+'s scale c multiplies them by
    c^2), so ``o`` is read twice: once squared, once scaled."""
    in_axis = -1 if out_axis == -2 else -2
    axis = out_axis if normuon == "output" or o.shape[out_axis] >= o.shape[in_axis] else in_axis  # the neurons'
    square = mean(o * o, axis=-1 if axis == -2 else -2)  # per neuron
    norm = sqrt(total(square, axis=-1, keepdims=True))  # |o| / sqrt(length), per matrix
    if renormalization:  # Muon+ first: o scaled by c, so its neurons' mean squares by c^2
        length = o.shape[-1 if axis == -2 else -2]
        scale = cast(py_sqrt(min(o.shape[-2:])), o) / maximum(
            norm * cast(py_sqrt(length), o), cast(RENORMALIZATION_EPS, o)
        )
        square, norm = square * (scale * scale), norm * scale
    second_moment = normuon_beta2 * second_moment + one_minus_normuon_beta2 * square
    root = sqrt(second_moment) + cast(NORMUON_EPS, o)
    factor = where(root > 0, one / root, root)  # 0 only for a silent neuron in float16
    norm_u = sqrt(total(square * factor * factor, axis=-1, keepdims=True))
    factor = factor * where(norm_u > 0, norm / norm_u, norm_u)
    if renormalization:
        factor = factor * scale
    return o * (factor[..., :, None] if axis == -2 else factor[..., None, :]), second_moment


def muon_direction(grad, param, v, momentum, one_minus_momentum, weight_decay, coupled, nesterov, **_):
    """The elementwise part: coupled decay and momentum, on a whole tensor or on any rows of it."""
    if coupled:
        grad = grad + weight_decay * param
    v = momentum * v + one_minus_momentum * grad
    return (grad * one_minus_momentum + v * momentum if nesterov else v), v


def muon_orthogonalize(
    direction,
    lr,
    ns_steps,
    ns_dtype,
    ns_eps,
    adjust_lr,
    layout,
    ns_coefficients="keller2024",
    ns_safety=1.0,
    row_equilibration=False,
    renormalization=False,
    batch_axes=0,
    num_heads=None,
    split_sizes=None,
    stack=0,
    second_moment=None,
    normuon=None,
    normuon_beta2=None,
    one_minus_normuon_beta2=None,
    one=None,
    **_,
):
    """The full-matrix part: Newton-Schulz on each matrix of ``direction`` (behind its first
    ``stack + batch_axes`` axes, and on each block of its output axis), NorMuon when
    ``second_moment`` is given, and the learning rate for its shape:
    ``(update, learning rate, second moment)``. Row-sharded torch parameters gather each
    matrix to one rank for it (treeopt.distributed.fsdp)."""
    stack += batch_axes
    lead, shape = tuple(direction.shape[:stack]), tuple(direction.shape[stack:])
    if len(shape) < 2 or 0 in shape:  # a zero-size matrix has nothing to orthogonalise
        return direction, lr, second_moment
    out, inner = oriented_shape(shape, layout)
    rows, columns = matrix_shape(shape, layout)
    matrix = direction.reshape(lead + (rows, columns)) if len(shape) > 2 else direction
    spans = blocks(out, num_heads, split_sizes)
    # the view's output axis: its rows, or its columns (flax); blocks cut rows, so they turn it
    flipped = layout == "in_out" and spans is not None
    if flipped:
        matrix = swap_last(matrix)
    out_axis = -1 if layout == "in_out" and not flipped else -2

    def polar(d):
        if row_equilibration:  # and divided as Newton-Schulz starts, in the same pass
            d = equilibrate(d, out_axis, ns_safety, ns_eps)
        if ns_dtype is None:
            d = newton_schulz(d, ns_steps, ns_eps, ns_coefficients, ns_safety, row_equilibration)
        else:  # opt-in: iterate in a lower precision (bfloat16 in the reference), then come back
            low = newton_schulz(astype(d, ns_dtype), ns_steps, ns_eps, ns_coefficients, ns_safety, row_equilibration)
            d = astype(low, dtype_name(d))
        # with NorMuon, Muon+'s scale is folded into NorMuon's pass over the update
        return renormalize(d) if renormalization and second_moment is None else d

    def step(d, s):
        # a matrix split across devices is orthogonalised whole, then split back as it was
        o = on_whole(polar, d)
        if s is not None:
            o, s = normuon_normalize(
                o, s, normuon, normuon_beta2, one_minus_normuon_beta2, one, out_axis, renormalization
            )
        return o, s

    if spans is None:
        update, second_moment = step(matrix, second_moment)
    elif num_heads is not None and num_heads > 1:  # equal blocks: a stack of heads
        size = out // num_heads
        heads = matrix.reshape(lead + (num_heads, size, inner))
        moments = None if second_moment is None else second_moment.reshape(lead + (num_heads, size))
        update, moments = step(heads, moments)
        update = update.reshape(lead + (out, inner))
        second_moment = None if moments is None else moments.reshape(lead + (out,))
    else:  # uneven blocks: each with its own learning-rate scale, folded into its rows
        parts, moments = [], []
        for start, stop in spans:
            piece = None if second_moment is None else second_moment[..., start:stop]
            o, piece = step(matrix[..., start:stop, :], piece)
            parts.append(o * cast(lr_scale((stop - start, inner), "out_in", adjust_lr), o))
            moments.append(piece)
        update = concatenate(parts, axis=-2)
        second_moment = None if second_moment is None else concatenate(moments, axis=-1)
    if flipped:
        update = swap_last(update)
    rate = matrix_lr(lr, shape, layout, adjust_lr, 0, num_heads, split_sizes)
    return update.reshape(direction.shape), rate, second_moment


def scaled_lr(lr, shape, layout, adjust_lr):
    """The learning rate of a matrix of ``shape`` (see :func:`lr_scale`)."""
    return lr * cast(lr_scale(shape, layout, adjust_lr), lr)


def matrix_lr(lr, shape, layout, adjust_lr, batch_axes=0, num_heads=None, split_sizes=None, **_):
    """The learning rate of one tensor of ``shape``: scaled by its matrices' shape, by a
    head's with ``num_heads``; with ``split_sizes`` each block's scale is in its update."""
    shape = tuple(shape[batch_axes:])
    if len(shape) < 2 or split_sizes is not None:
        return lr
    if num_heads is not None and num_heads > 1:
        out, inner = oriented_shape(shape, layout)
        return scaled_lr(lr, (out // num_heads, inner), "out_in", adjust_lr)
    return scaled_lr(lr, shape, layout, adjust_lr)


def muon_apply(param, direction, lr, keep, cautious=False, **_):
    """The last, elementwise part: decoupled decay (by the unscaled learning rate, as the
    references do; cautious: only where the update and the weight agree in sign) and the step."""
    if keep is not None and cautious:
        # p * keep where O * p >= 0, else p. With step = -lr * O (lr >= 0), step * p <= 0 there,
        # so for keep in [0, 1] max(keep, sign(step * p)) is keep there and 1 elsewhere (a product
        # that underflows to zero aside): arithmetic, not a select, which torch runs as a scalar
        # loop on CPUs, several times as long as an elementwise product
        step = -lr * direction
        return param * maximum(keep, sign(step * param)) + step
    if keep is not None:
        param = param * keep
    return param - lr * direction


def muon(
    grad,
    param,
    *slots,
    lr,
    momentum,
    one_minus_momentum,
    weight_decay,
    coupled,
    keep,
    cautious,
    one,
    nesterov,
    ns_steps,
    ns_dtype,
    ns_eps,
    ns_coefficients,
    ns_safety,
    row_equilibration,
    renormalization,
    normuon,
    normuon_beta2,
    one_minus_normuon_beta2,
    adjust_lr,
    layout,
    batch_axes,
    num_heads,
    split_sizes,
    stacked=False,
):
    v, *second_moment = slots
    direction, v = muon_direction(grad, param, v, momentum, one_minus_momentum, weight_decay, coupled, nesterov)
    direction, step_lr, moment = muon_orthogonalize(
        direction,
        lr,
        ns_steps,
        ns_dtype,
        ns_eps,
        adjust_lr,
        layout,
        ns_coefficients,
        ns_safety,
        row_equilibration,
        renormalization,
        batch_axes,
        num_heads,
        split_sizes,
        int(stacked),
        second_moment[0] if second_moment else None,
        normuon,
        normuon_beta2,
        one_minus_normuon_beta2,
        one,
    )
    return (muon_apply(param, direction, step_lr, keep, cautious), v, *([moment] if second_moment else []))


def muon_whole(direction, *second_moment, stack=0, **coefficients):
    """Parts.whole: Newton-Schulz (and NorMuon, on the second moment when there is one) on
    whole matrices; a row-sharded weight's rows are gathered to one rank for it
    (treeopt.distributed.fsdp)."""
    moment = second_moment[0] if second_moment else None
    update, _, moment = muon_orthogonalize(direction, stack=stack, second_moment=moment, **coefficients)
    return (update, moment) if second_moment else (update,)


def muon_step(param, direction, shape, lr, keep, cautious, layout, adjust_lr, batch_axes, num_heads, split_sizes, **_):
    """Parts.apply: the step of :func:`muon_apply` at the learning rate of a whole tensor of
    ``shape`` (each rank holding some of its rows computes the same)."""
    rate = matrix_lr(lr, shape, layout, adjust_lr, batch_axes, num_heads, split_sizes)
    return muon_apply(param, direction, rate, keep, cautious)


MUON = Rule(
    "muon",
    muon,
    muon_coefficients,
    slots=muon_slots,
    elementwise=False,
    stackable=True,
    slot_meanings={"v": "average of gradients", "second_moment": "average of squared updates per neuron"},
    parts=Parts(muon_direction, muon_whole, muon_step, whole_slots=("second_moment",)),
)
