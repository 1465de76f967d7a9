"""The built-in optimizers: each declares its hyper-parameters, checks them, and points at
its rule in :mod:`treeopt.rules`, where the math is.

Every numeric hyper-parameter may also be a schedule (a callable of the step); its current
value then lives in the state under its name, like ``learning_rate``.
"""

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence

from treeopt import engine, rules, scalars
from treeopt.filters import is_embedding, is_head
from treeopt.optimizer import Optimizer
from treeopt.precision import StatePrecision, state_precision
from treeopt.rules.adafactor import factored_rsqrt
from treeopt.rules.muon import ADJUST_LR, LAYOUTS, NORMUON, NS_EPS, NS_TABLES
from treeopt.types import Array, Scalar, Tree


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class _Builtin(Optimizer):
    """Shared constructor helpers of the built-in optimizers.

    Every built-in optimizer takes ``state_dtype=`` (keyword-only): ``None`` (the default:
    slots in the parameter's dtype, as MLX), ``"float32"``, ``"bfloat16"`` (computed in
    float32, written back with seeded stochastic rounding) or ``"int8"`` (block-wise codes
    with a float32 scale per block), or a :class:`treeopt.precision.StatePrecision`. The rule
    is the same; only how its slots are stored changes (see ``docs/precision.md``).
    """

    def __init__(self, state_dtype: str | StatePrecision | None = None) -> None:
        precision = state_precision(state_dtype, type(self).__name__)  # checked before anything is set
        if precision is not None and (
            type(self).apply_single is not Optimizer.apply_single or type(self).init_single is not Optimizer.init_single
        ):
            raise ValueError(
                f"{type(self).__name__} state_dtype={precision.dtype!r} needs the built-in rule, and "
                f"{type(self).__name__} has its own init_single or apply_single (which read and write slots "
                "in the parameter's dtype)"
            )
        super().__init__()
        self.store.precision = precision  # how the group's slots are stored (treeopt.precision)

    def _set_learning_rate(self, learning_rate):
        if not (callable(learning_rate) or _is_number(learning_rate) or hasattr(learning_rate, "dtype")):
            raise TypeError(
                f"{type(self).__name__} learning_rate must be a number, an array or a schedule, "
                f"got {type(learning_rate).__name__}"
            )
        self._maybe_schedule("learning_rate", learning_rate)

    def _set(self, name, value, check=None, message=None):
        """Store hyper-parameter ``name``: a number (checked by ``check``) or a schedule."""
        if callable(value):
            self._maybe_schedule(name, value)
        elif _is_number(value):
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{type(self).__name__} {name} must be a finite number, {value} was provided instead")
            if check is not None and not check(value):
                raise ValueError(message.format(name=type(self).__name__, value=value))
        else:
            raise TypeError(f"{type(self).__name__} {name} must be a number or a schedule, got {type(value).__name__}")
        setattr(self, name, value)

    def _set_betas(self, betas, count=2):
        label = type(self).__name__
        betas = tuple(betas)
        if len(betas) != count:
            raise ValueError(f"{label} betas should have {count} values, got {len(betas)}")
        values = []
        for i, beta in enumerate(betas):
            if callable(beta):  # a scheduled beta lives in the state as betas[i]
                self._maybe_schedule(f"betas[{i}]", beta)
            elif not _is_number(beta) or not 0.0 <= beta < 1.0:
                raise ValueError(f"{label} beta{i + 1} should be in [0, 1), {beta} was provided instead")
            values.append(beta if callable(beta) else float(beta))
        self.betas = tuple(values)


_NON_NEGATIVE = "{name} {value_name} should be >=0, {value} was provided instead"


def _non_negative(what):
    return _NON_NEGATIVE.replace("{value_name}", what)


class SGD(_Builtin):
    r"""Stochastic gradient descent, with optional momentum, Nesterov and weight decay.

    .. math::

        g &\leftarrow g + \lambda_{wd} w \\
        v &\leftarrow \mu v + (1 - \tau) g \\
        w &\leftarrow w - \eta (g + \mu v \text{ if nesterov else } v)

    As in MLX the momentum buffer starts at zero and dampening applies from the first step.

    Args:
        learning_rate (float or callable): the learning rate :math:`\eta`.
        momentum (float): the momentum :math:`\mu`. Default: ``0``.
        weight_decay (float): L2 penalty :math:`\lambda_{wd}`, added to the gradient. Default: ``0``.
        dampening (float): dampening :math:`\tau` of the momentum. Default: ``0``.
        nesterov (bool): Nesterov momentum. Default: ``False``.

    Example:
        >>> import numpy as np, treeopt as optim
        >>> opt = optim.SGD(0.1, momentum=0.9)
        >>> params = {"w": np.array([1.0, 2.0], np.float32)}
        >>> opt.update(params, {"w": np.array([1.0, 1.0], np.float32)})
        >>> params["w"]
        array([0.9, 1.9], dtype=float32)
    """

    rule = rules.SGD

    def __init__(
        self,
        learning_rate: Scalar,
        momentum: Scalar = 0.0,
        weight_decay: Scalar = 0.0,
        dampening: Scalar = 0.0,
        nesterov: bool = False,
        *,
        state_dtype: str | StatePrecision | None = None,
    ) -> None:
        if nesterov and (not callable(momentum) and momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening.")
        super().__init__(state_dtype=state_dtype)
        self._set_learning_rate(learning_rate)
        self._set("momentum", momentum, lambda v: v >= 0, _non_negative("momentum"))
        self._set("weight_decay", weight_decay, lambda v: v >= 0, _non_negative("weight_decay"))
        self._set(
            "dampening",
            dampening,
            lambda v: 0 <= v <= 1,
            "{name} dampening should be in [0, 1], {value} was provided instead",
        )
        self.nesterov = bool(nesterov)


class RMSprop(_Builtin):
    r"""RMSprop (Tieleman and Hinton, 2012).

    .. math::

        v &\leftarrow \alpha v + (1 - \alpha) g^2 \\
        w &\leftarrow w - \eta \frac{g}{\sqrt{v} + \epsilon}

    Args:
        learning_rate (float or callable): the learning rate :math:`\eta`.
        alpha (float): smoothing constant, in [0, 1]. Default: ``0.99``.
        eps (float): added to the denominator, > 0. Default: ``1e-8``.
    """

    rule = rules.RMSPROP

    def __init__(
        self,
        learning_rate: Scalar,
        alpha: Scalar = 0.99,
        eps: Scalar = 1e-8,
        *,
        state_dtype: str | StatePrecision | None = None,
    ) -> None:
        super().__init__(state_dtype=state_dtype)
        if _is_number(alpha) and alpha < 0:
            raise ValueError(f"RMSprop alpha should be >=0, {alpha} was provided instead")
        if _is_number(eps) and eps <= 0:
            raise ValueError(f"RMSprop epsilon should be >0, {eps} was provided instead")
        self._set_learning_rate(learning_rate)
        self._set("alpha", alpha, lambda v: v <= 1, "{name} alpha should be <=1, {value} was provided instead")
        self._set("eps", eps)


class Adagrad(_Builtin):
    r"""Adagrad (Duchi et al., 2011).

    .. math::

        v &\leftarrow v + g^2 \\
        w &\leftarrow w - \eta \frac{g}{\sqrt{v} + \epsilon}

    Args:
        learning_rate (float or callable): the learning rate :math:`\eta`.
        eps (float): added to the denominator, > 0. Default: ``1e-8``.
    """

    rule = rules.ADAGRAD

    def __init__(
        self,
        learning_rate: Scalar,
        eps: Scalar = 1e-8,
        *,
        state_dtype: str | StatePrecision | None = None,
    ) -> None:
        super().__init__(state_dtype=state_dtype)
        if _is_number(eps) and eps <= 0:
            raise ValueError(f"Adagrad epsilon should be >0, {eps} was provided instead")
        self._set_learning_rate(learning_rate)
        self._set("eps", eps)


class AdaDelta(_Builtin):
    r"""AdaDelta (Zeiler, 2012).

    .. math::

        v &\leftarrow \rho v + (1 - \rho) g^2 \\
        \Delta &= \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}} g \\
        u &\leftarrow \rho u + (1 - \rho) \Delta^2 \\
        w &\leftarrow w - \eta \Delta

    Args:
        learning_rate (float or callable): the learning rate :math:`\eta`.
        rho (float): averaging coefficient, in [0, 1]. Default: ``0.9``.
        eps (float): added inside the square roots, > 0. Default: ``1e-6``.
    """

    rule = rules.ADADELTA

    def __init__(
        self,
        learning_rate: Scalar,
        rho: Scalar = 0.9,
        eps: Scalar = 1e-6,
        *,
        state_dtype: str | StatePrecision | None = None,
    ) -> None:
        super().__init__(state_dtype=state_dtype)
        if _is_number(rho) and rho < 0:
            raise ValueError(f"AdaDelta rho should be >=0, {rho} was provided instead")
        if _is_number(eps) and eps <= 0:
            raise ValueError(f"AdaDelta epsilon should be >0, {eps} was provided instead")
        self._set_learning_rate(learning_rate)
        self._set("rho", rho, lambda v: v <= 1, "{name} rho should be <=1, {value} was provided instead")
        self._set("eps", eps)


class Adam(_Builtin):
    r"""Adam (Kingma and Ba, 2015).

    .. math::

        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        w &\leftarrow w - \eta \frac{m}{\sqrt{v} + \epsilon}

    With ``bias_correction`` (off by default, as in MLX) the step uses
    :math:`\eta / (1 - \beta_1^t)` and :math:`\sqrt{v / (1 - \beta_2^t)}`, as in PyTorch.

    Args:
        learning_rate (float or callable): the learning rate :math:`\eta`.
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)`, each in [0, 1). Default: ``(0.9, 0.999)``.
        eps (float): added to the denominator, >= 0. Default: ``1e-8``.
        bias_correction (bool): correct the moments' bias toward zero. Default: ``False``.
    """

    rule = rules.ADAM

    def __init__(
        self,
        learning_rate: Scalar,
        betas: tuple[Scalar, Scalar] = (0.9, 0.999),
        eps: Scalar = 1e-8,
        bias_correction: bool = False,
        *,
        state_dtype: str | StatePrecision | None = None,
    ) -> None:
        super().__init__(state_dtype=state_dtype)
        if _is_number(eps) and eps < 0:
            raise ValueError(f"{type(self).__name__} epsilon should be >=0, {eps} was provided instead")
        self._set_learning_rate(learning_rate)
        self._set_betas(betas)
        self._set("eps", eps)
        self.bias_correction = bool(bias_correction)


class AdamW(Adam):
    r"""AdamW (Loshchilov and Hutter, 2019): Adam with decoupled weight decay.

    .. math::

        w &\leftarrow w (1 - \eta \lambda) \\
        w &\leftarrow \mathrm{Adam}(w)

    Args:
        learning_rate (float or callable): the learning rate :math:`\eta`.
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)`. Default: ``(0.9, 0.999)``.
        eps (float): added to the denominator. Default: ``1e-8``.
        weight_decay (float): the decay :math:`\lambda`, >= 0. Default: ``0.01``.
        bias_correction (bool): as in :class:`Adam`. Default: ``False``.
    """

    rule = rules.ADAMW

    def __init__(
        self,
        learning_rate: Scalar,
        betas: tuple[Scalar, Scalar] = (0.9, 0.999),
        eps: Scalar = 1e-8,
        weight_decay: Scalar = 0.01,
        bias_correction: bool = False,
        *,
        state_dtype: str | StatePrecision | None = None,
    ) -> None:
        super().__init__(learning_rate, betas=betas, eps=eps, bias_correction=bias_correction, state_dtype=state_dtype)
        self._set("weight_decay", weight_decay, lambda v: v >= 0, _non_negative("weight_decay"))


class Adamax(Adam):
    r"""Adamax (Kingma and Ba, 2015): Adam with the infinity norm.

    .. math::

        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        v &\leftarrow \max(\beta_2 v, |g|) \\
        w &\leftarrow w - \eta \frac{m}{v + \epsilon}

    Args:
        learning_rate (float or callable): the learning rate :math:`\eta`.
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)`. Default: ``(0.9, 0.999)``.
        eps (float): added to the denominator. Default: ``1e-8``.
    """

    rule = rules.ADAMAX

    def __init__(
        self,
        learning_rate: Scalar,
        betas: tuple[Scalar, Scalar] = (0.9, 0.999),
        eps: Scalar = 1e-8,
        *,
        state_dtype: str | StatePrecision | None = None,
    ) -> None:
        super().__init__(learning_rate, betas=betas, eps=eps, state_dtype=state_dtype)


class Lion(_Builtin):
    r"""Lion (Chen et al., 2023): the sign of an interpolated momentum.

    .. math::

        c &= \beta_1 m + (1 - \beta_1) g \\
        m &\leftarrow \beta_2 m + (1 - \beta_2) g \\
        w &\leftarrow w (1 - \eta \lambda) - \eta\, \mathrm{sign}(c)

    Use a learning rate 3-10x smaller and a weight decay 3-10x larger than for AdamW.

    Args:
        learning_rate (float or callable): the learning rate :math:`\eta`.
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)`. Default: ``(0.9, 0.99)``.
        weight_decay (float): the decoupled decay :math:`\lambda`, >= 0. Default: ``0``.
    """

    rule = rules.LION

    def __init__(
        self,
        learning_rate: Scalar,
        betas: tuple[Scalar, Scalar] = (0.9, 0.99),
        weight_decay: Scalar = 0.0,
        *,
        state_dtype: str | StatePrecision | None = None,
    ) -> None:
        super().__init__(state_dtype=state_dtype)
        self._set_learning_rate(learning_rate)
        self._set_betas(betas)
        self._set("weight_decay", weight_decay, lambda v: v >= 0, _non_negative("weight_decay"))


class Adafactor(_Builtin):
    r"""Adafactor (Shazeer and Stern, 2018): factored second moments, sub-linear memory.

    For a matrix (or a batch of matrices) only row and column averages of :math:`g^2` are
    kept. By default the step size is relative (:math:`\min(10^{-2}, 1/\sqrt{t})`) and scaled
    by the parameter's RMS; ``learning_rate`` is then ignored, as in MLX. See
    :mod:`treeopt.rules.adafactor` for the full update.

    Args:
        learning_rate (float or callable, optional): used when ``relative_step=False``.
        eps (tuple[float, float]): :math:`(\epsilon_1, \epsilon_2)`: added to :math:`g^2`, and
            the smallest parameter scale. Default: ``(1e-30, 1e-3)``.
        clip_threshold (float): clips the unscaled update's RMS, > 0. Default: ``1.0``.
        decay_rate (float): :math:`\hat\beta_2 = 1 - t^{\text{decay\_rate}}`, <= 0. Default: ``-0.8``.
        beta_1 (float, optional): first-moment coefficient in [0, 1); ``None`` keeps no
            first moment. Default: ``None``.
        weight_decay (float): >= 0. Default: ``0``.
        scale_parameter (bool): scale the step by the parameter's RMS. Default: ``True``.
        relative_step (bool): use the relative step size. Default: ``True``.
        warmup_init (bool): relative step warm-up, :math:`10^{-6} t`. Default: ``False``.
    """

    rule = rules.ADAFACTOR

    def __init__(
        self,
        learning_rate: Scalar | None = None,
        eps: Sequence[float] = (1e-30, 1e-3),
        clip_threshold: Scalar = 1.0,
        decay_rate: Scalar = -0.8,
        beta_1: float | None = None,
        weight_decay: Scalar = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        state_dtype: str | StatePrecision | None = None,
    ) -> None:
        super().__init__(state_dtype=state_dtype)
        eps = tuple(eps)
        if len(eps) != 2 or not all(_is_number(e) and e >= 0 for e in eps):
            raise ValueError(f"Adafactor eps should be two numbers >=0, {eps} was provided instead")
        if beta_1 is not None and not (_is_number(beta_1) and 0 <= beta_1 < 1):
            raise ValueError(f"Adafactor beta_1 should be None or in [0, 1), {beta_1} was provided instead")
        if not relative_step and learning_rate is None:
            raise ValueError("Adafactor with relative_step=False needs a learning_rate")
        if learning_rate is not None:
            self._set_learning_rate(learning_rate)
        self.eps = tuple(float(e) for e in eps)
        self._set(
            "clip_threshold",
            clip_threshold,
            lambda v: v > 0,
            "{name} clip_threshold should be >0, {value} was provided instead",
        )
        self._set(
            "decay_rate", decay_rate, lambda v: v <= 0, "{name} decay_rate should be <=0, {value} was provided instead"
        )
        self.beta_1 = None if beta_1 is None else float(beta_1)
        self._set("weight_decay", weight_decay, lambda v: v >= 0, _non_negative("weight_decay"))
        self.scale_parameter = bool(scale_parameter)
        self.relative_step = bool(relative_step)
        self.warmup_init = bool(warmup_init)

    def _approximate_exp_moving_avg(self, exp_avg_sq_row, exp_avg_sq_col):
        """MLX's name for the factored preconditioner (kept for code that calls it): the
        inverse square root of the second moment the row and column averages stand for."""
        return factored_rsqrt(exp_avg_sq_row, exp_avg_sq_col)


@contextlib.contextmanager
def default_layout(layout: str) -> Iterator[None]:
    """Within this block, a :class:`Muon` built with ``layout=None`` takes the weights as laid
    out ``layout`` (``"out_in"`` or ``"in_out"``; outside any block: ``"out_in"``, as MLX).
    An explicit ``Muon(layout=...)`` always wins. :mod:`treeopt.jax` runs ``init``, ``update``
    and ``as_optax`` in ``default_layout("in_out")``, flax's layout. Blocks nest, and each
    thread (each asyncio task) has its own.

    Example:
        >>> import numpy as np
        >>> import treeopt as optim
        >>> muon = optim.Muon(0.02)
        >>> with optim.optimizers.default_layout("in_out"):
        ...     muon.scalars.hyperparameters()["layout"]
        'in_out'
        >>> muon.scalars.hyperparameters()["layout"]
        'out_in'
    """
    if layout not in LAYOUTS:
        raise ValueError(f"default_layout: layout should be one of {LAYOUTS}, {layout!r} was provided instead")
    with scalars.context(layout=layout):
        yield


class Muon(_Builtin):
    r"""Muon (Jordan et al., 2024): momentum orthogonalised by Newton-Schulz iterations.

    Meant for the hidden matrices of a network; route embeddings, the output head, norms and
    biases to :class:`AdamW` with :class:`MultiOptimizer`. Tensors with more than two
    dimensions are viewed as a matrix by ``layout`` (``(shape[0], -1)`` by default, as MLX);
    tensors with fewer get the momentum step only. As in MLX, weight decay is coupled (added to the gradient) unless
    ``decoupled_weight_decay``. See :mod:`treeopt.rules.muon` and ``docs/muon.md``.

    Args:
        learning_rate (float or callable): the learning rate.
        momentum (float): in [0, 1). Default: ``0.95``.
        weight_decay (float): >= 0. Default: ``0.01``.
        nesterov (bool): Nesterov momentum. Default: ``True``.
        ns_steps (int): Newton-Schulz iterations, >= 0. Default: ``5``.
        allow (list[str]): silence the routing guard for ``"vectors"``, ``"embeddings"`` or
            ``"heads"`` (keyword-only).
        ns_dtype (str, optional): run Newton-Schulz in this dtype, e.g. ``"bfloat16"`` as the
            reference implementation does (keyword-only; default: the gradient's dtype, as in
            MLX). In bfloat16 the orthogonalised update differs from float32's by about
            3.5% (relative Frobenius norm, measured on Gaussian matrices from 256 x 256 to
            1024 x 256, 5 iterations); it pays off on accelerators with bfloat16 matrix
            units, not on CPUs.
        decoupled_weight_decay (bool): shrink the weights by ``1 - lr * weight_decay``
            before the step, as Keller Jordan's reference, ``torch.optim.Muon`` and optax do,
            instead of adding ``weight_decay * p`` to the gradient (MLX's coupled decay, which
            Newton-Schulz normalises up to the full learning rate). Keyword-only. Default:
            ``False``.
        ns_eps (float): added to the Frobenius norm before Newton-Schulz (keyword-only).
            Default: ``1e-7``, as in MLX and Keller Jordan's reference (optax uses ``1e-8``).
        adjust_lr (str): how a matrix's learning rate is scaled by its shape (keyword-only):
            ``"original"`` (default, as MLX and Keller Jordan): ``sqrt(max(1, rows / cols))``;
            ``"match_rms_adamw"`` (Moonlight): ``0.2 * sqrt(max(rows, cols))``, so that the
            update's RMS is AdamW's and one learning rate serves both.
        layout (str, optional): where the weights keep their output axis (keyword-only):
            ``"out_in"``: first, as MLX, torch and equinox (``(out, in)``, conv kernels
            ``(out, in, kh, kw)`` viewed as ``(out, in * kh * kw)``, as Keller Jordan does);
            ``"in_out"``: last, as flax and Keras (``(in, out)``, conv kernels
            ``(kh, kw, in, out)`` viewed as ``(kh * kw * in, out)``, as optax does). Default
            ``None``: ``"out_in"``, except under :mod:`treeopt.jax`'s ``init``/``update``/
            ``as_optax``, which follow flax (``"in_out"``).

        The variants the field runs now, keyword-only, off by default (``docs/muon.md`` says
        what each computes and which reference it is checked against):

        ns_coefficients (str): the Newton-Schulz coefficient table: ``"keller2024"`` (one
            triple, every step: Keller Jordan's and MLX's) or ``"polar_express"`` (a triple
            per step, Amsel et al. 2025, as nanochat, modded-nanogpt and dion run it).
        ns_safety (float, optional): Newton-Schulz divides by ``ns_safety`` times the
            Frobenius norm, >= 1. Default: the table's (1 for ``"keller2024"``, 1.02 for
            ``"polar_express"``, as dion and modded-nanogpt; nanochat uses 1.01).
        normuon (bool, str or None): NorMuon (Li et al., 2025): after Newton-Schulz, each neuron's
            update is divided by the root of its running mean square (``normuon_beta2``) and
            the matrix scaled back to its norm. ``True`` or ``"output"``: the neurons are the
            outputs, as the paper, its reference and dion; ``"larger"``: the rows or the
            columns, whichever side is longer, as modded-nanogpt and nanochat. Adds a slot
            ``second_moment`` of one value per neuron.
        normuon_beta2 (float): NorMuon's decay, in [0, 1). Default: ``0.95``.
        cautious_weight_decay (bool): decay only where the update and the weight agree in
            sign (modded-nanogpt, nanochat, dion). Needs ``decoupled_weight_decay``.
        row_equilibration (bool): MuonEq: before Newton-Schulz, scale every output row of
            the momentum to the rows' mean norm (as nanochat).
        renormalization (bool): Muon+: after Newton-Schulz, scale the update to the norm of
            a semi-orthogonal matrix, ``sqrt(min(rows, cols))`` (as nanochat).
        batch_axes (int): leading axes that index separate matrices, e.g. 1 for experts
            ``(E, out, in)``: each gets its own Newton-Schulz. Default: ``0``.
        num_heads (int, optional): orthogonalise the output axis as this many equal blocks
            (attention heads), each with its own learning-rate scale and NorMuon norm (dion's
            ``num_heads``).
        split_sizes (tuple[int, ...], optional): orthogonalise the output axis in blocks of
            these sizes (a fused QKV projection), each as if it were its own parameter (dion's
            ``split_sizes``). Excludes ``num_heads``.
    """

    rule = rules.MUON
    _SUITED = ("vectors", "embeddings", "heads")

    def __init__(
        self,
        learning_rate: Scalar,
        momentum: Scalar = 0.95,
        weight_decay: Scalar = 0.01,
        nesterov: bool = True,
        ns_steps: int = 5,
        *,
        allow: Sequence[str] | str = (),
        ns_dtype: str | None = None,
        decoupled_weight_decay: bool = False,
        ns_eps: float = NS_EPS,
        adjust_lr: str = "original",
        layout: str | None = None,
        ns_coefficients: str = "keller2024",
        ns_safety: float | None = None,
        normuon: bool | str | None = False,
        normuon_beta2: Scalar = 0.95,
        cautious_weight_decay: bool = False,
        row_equilibration: bool = False,
        renormalization: bool = False,
        batch_axes: int = 0,
        num_heads: int | None = None,
        split_sizes: Sequence[int] | None = None,
        state_dtype: str | StatePrecision | None = None,
    ) -> None:
        super().__init__(state_dtype=state_dtype)
        self.scalars.defaults["layout"] = "out_in"  # layout=None: this, or default_layout's
        self._set_variants(
            ns_coefficients,
            ns_safety,
            normuon,
            cautious_weight_decay,
            decoupled_weight_decay,
        )
        self._set(
            "normuon_beta2",
            normuon_beta2,
            lambda v: 0 <= v < 1,
            "{name} normuon_beta2 should be in [0, 1), {value} was provided instead",
        )
        self.row_equilibration, self.renormalization = bool(row_equilibration), bool(renormalization)
        self._set_view(batch_axes, num_heads, split_sizes)
        if layout not in (None, *LAYOUTS):
            raise ValueError(f"Muon layout should be None or one of {LAYOUTS}, {layout!r} was provided instead")
        self.layout = layout
        if adjust_lr not in ADJUST_LR:
            raise ValueError(f"Muon adjust_lr should be one of {ADJUST_LR}, {adjust_lr!r} was provided instead")
        if not _is_number(ns_eps) or not ns_eps > 0:
            raise ValueError(f"Muon ns_eps should be a number >0, {ns_eps!r} was provided instead")
        self.adjust_lr, self.ns_eps = adjust_lr, float(ns_eps)
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        if ns_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(
                f"Muon ns_dtype should be None, 'bfloat16', 'float16' or 'float32', {ns_dtype!r} was provided instead"
            )
        self.ns_dtype = ns_dtype
        allow = (allow,) if isinstance(allow, str) else tuple(allow)
        if any(a not in self._SUITED for a in allow):
            raise ValueError(f"Muon allow should name some of {self._SUITED}, {allow!r} was provided instead")
        self.allow = allow
        self._set_learning_rate(learning_rate)
        self._set(
            "momentum",
            momentum,
            lambda v: 0 <= v < 1,
            "{name} momentum should be in [0, 1), {value} was provided instead",
        )
        self._set("weight_decay", weight_decay, lambda v: v >= 0, _non_negative("weight_decay"))
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, numbers.Integral) or ns_steps < 0:
            raise ValueError(f"Muon ns_steps should be an integer >=0, {ns_steps!r} was provided instead")
        self.nesterov = bool(nesterov)
        self.ns_steps = int(ns_steps)

    def _set_variants(self, table, safety, normuon, cautious, decoupled):
        if table not in NS_TABLES:
            raise ValueError(
                f"Muon ns_coefficients should be one of {tuple(NS_TABLES)}, {table!r} was provided instead"
            )
        if safety is not None and (not _is_number(safety) or not 1 <= safety < math.inf):
            raise ValueError(f"Muon ns_safety should be None or a number >= 1, {safety!r} was provided instead")
        if normuon is True:
            normuon = "output"
        if normuon is not False and normuon is not None and normuon not in NORMUON:
            raise ValueError(
                f"Muon normuon should be True, False, None or one of {NORMUON}, {normuon!r} was provided instead"
            )
        if cautious and not decoupled:
            raise ValueError(
                "Muon cautious_weight_decay masks the decoupled decay p <- p * (1 - lr * wd) where the update and "
                "the weight agree in sign; it needs decoupled_weight_decay=True (a coupled decay is part of the "
                "gradient, before Newton-Schulz)"
            )
        self.ns_coefficients, self.ns_safety = table, None if safety is None else float(safety)
        self.normuon = normuon or None
        self.cautious_weight_decay = bool(cautious)

    def _set_view(self, batch_axes, num_heads, split_sizes):
        if isinstance(batch_axes, bool) or not isinstance(batch_axes, numbers.Integral) or batch_axes < 0:
            raise ValueError(f"Muon batch_axes should be an integer >= 0, {batch_axes!r} was provided instead")
        if num_heads is not None and (
            isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1
        ):
            raise ValueError(f"Muon num_heads should be None or an integer >= 1, {num_heads!r} was provided instead")
        if split_sizes is not None:
            sizes = tuple(split_sizes) if isinstance(split_sizes, (tuple, list)) else ()
            if len(sizes) < 2 or any(
                isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in sizes
            ):
                raise ValueError(
                    f"Muon split_sizes should be None or two or more positive integers, {split_sizes!r} was provided instead"
                )
            split_sizes = tuple(int(n) for n in sizes)
            if num_heads is not None:
                raise ValueError("Muon takes num_heads (equal blocks) or split_sizes (given blocks), not both")
        if self.normuon == "larger" and (split_sizes is not None or (num_heads or 1) > 1):
            raise ValueError(
                "Muon normuon='larger' picks rows or columns per matrix; with num_heads or split_sizes use "
                "normuon='output' (per output neuron, as dion)"
            )
        self.batch_axes = int(batch_axes)
        self.num_heads = None if num_heads is None else int(num_heads)
        self.split_sizes = split_sizes

    def unsuited(self, path: str, parameter: Array) -> str | None:
        """Muon orthogonalises hidden matrices. In a MultiOptimizer it warns (or refuses) on
        vectors and scalars, embeddings and output heads, unless ``allow`` names them."""
        if len(parameter.shape) < 2 and "vectors" not in self.allow:
            return (
                f"Muon got a {len(parameter.shape)}-D tensor: it orthogonalises matrices "
                "(route vectors and scalars to AdamW, or Muon(allow=['vectors']))"
            )
        if is_embedding(path, parameter) and "embeddings" not in self.allow:
            return "Muon got what looks like an embedding (use AdamW, or Muon(allow=['embeddings']))"
        if is_head(path, parameter) and "heads" not in self.allow:
            return "Muon got what looks like an output head (use AdamW, or Muon(allow=['heads']))"
        return None


class ScheduleFreeAdamW(_Builtin):
    r"""Schedule-free AdamW (Defazio et al., 2024): no learning-rate decay to tune.

    Gradients are taken at :math:`y`, an interpolation between the base sequence :math:`z`
    (an Adam step with decay at :math:`y`) and the running average :math:`x`, whose weights
    come from the largest learning rate so far:

    .. math::

        z &\leftarrow z - \eta \left(\frac{g}{\sqrt{\hat v} + \epsilon} + \lambda y\right),
        \quad x \leftarrow (1 - c_t)\, x + c_t z,
        \quad y \leftarrow \beta_1 x + (1 - \beta_1) z

    The parameters are :math:`y`; evaluate the model at :meth:`eval_params`. Numbers agree
    with ``optax.contrib.schedule_free_adamw`` (see :mod:`treeopt.rules.schedule_free`).
    Warm up with a learning-rate schedule; its largest value so far weights the average.

    Args:
        learning_rate (float or callable): the learning rate :math:`\eta`.
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)`: the interpolation and the
            second moment's decay, each in [0, 1). Default: ``(0.9, 0.999)``.
        eps (float): added to the denominator, >= 0. Default: ``1e-8``.
        weight_decay (float): :math:`\lambda`, >= 0, applied at :math:`y`. Default: ``0``.
        weight_lr_power (float): the average weights step :math:`t` by
            :math:`\max_{i \le t} \eta_i^{p}`, >= 0. Default: ``2``.
    """

    rule = rules.SCHEDULE_FREE_ADAMW

    def __init__(
        self,
        learning_rate: Scalar,
        betas: tuple[Scalar, Scalar] = (0.9, 0.999),
        eps: Scalar = 1e-8,
        weight_decay: Scalar = 0.0,
        weight_lr_power: Scalar = 2.0,
        *,
        state_dtype: str | StatePrecision | None = None,
    ) -> None:
        super().__init__(state_dtype=state_dtype)
        self._set_learning_rate(learning_rate)
        self._set_betas(betas)
        if not callable(self.betas[0]) and self.betas[0] == 0:
            raise ValueError("ScheduleFreeAdamW beta1 should be in (0, 1): the average is recovered by dividing by it")
        self._set("eps", eps, lambda v: v >= 0, _non_negative("eps"))
        self._set("weight_decay", weight_decay, lambda v: v >= 0, _non_negative("weight_decay"))
        self._set("weight_lr_power", weight_lr_power, lambda v: v >= 0, _non_negative("weight_lr_power"))

    def eval_params(self, params: Tree) -> Tree:
        """The parameters to evaluate the model at: the average :math:`x = (y - (1 - \\beta_1)
        z) / \\beta_1` of every parameter with state (``params``, the :math:`y`, are not
        changed; a parameter without state is returned as it is)."""
        b1 = self.scalars.hyperparameters()["betas"][0]
        pairs = engine.collect(params, params, type(self).__name__, check_pairs=False)
        for pair in pairs:
            slots = self.store.slots(pair.keys) if pair.grad is not None else None
            if slots:
                pair.result = (pair.param - (1 - b1) * slots["z"]) / b1
        return engine.with_results(params, iter(pairs))


class Adan(_Builtin):
    r"""Adan (Xie et al., 2022): adaptive Nesterov momentum from gradient differences.

    .. math::

        m &\leftarrow (1 - \beta_1) g + \beta_1 m, \quad
        v \leftarrow (1 - \beta_2)(g - g_{-1}) + \beta_2 v \\
        n &\leftarrow (1 - \beta_3)\,(g + (1 - \beta_2)(g - g_{-1}))^2 + \beta_3 n \\
        w &\leftarrow w - \eta \left(\frac{\hat m + (1 - \beta_2) \hat v}{\sqrt{\hat n} + \epsilon}
        + \lambda w\right)

    with bias-corrected averages :math:`\hat m, \hat v, \hat n`. The betas are the averages'
    decays, as in the paper's code and optax's ``adan``, whose numbers it matches (see
    :mod:`treeopt.rules.adan`).

    Args:
        learning_rate (float or callable): the learning rate :math:`\eta`.
        betas (tuple[float, float, float]): :math:`(\beta_1, \beta_2, \beta_3)`, each in
            [0, 1). Default: ``(0.98, 0.92, 0.99)``.
        eps (float): added to the denominator, >= 0. Default: ``1e-8``.
        weight_decay (float): :math:`\lambda`, >= 0. Default: ``0``.
        eps_root (float): added inside the square root, >= 0 (keyword-only). Default: ``0``.
    """

    rule = rules.ADAN

    def __init__(
        self,
        learning_rate: Scalar,
        betas: tuple[Scalar, Scalar, Scalar] = (0.98, 0.92, 0.99),
        eps: Scalar = 1e-8,
        weight_decay: Scalar = 0.0,
        *,
        eps_root: Scalar = 0.0,
        state_dtype: str | StatePrecision | None = None,
    ) -> None:
        super().__init__(state_dtype=state_dtype)
        self._set_learning_rate(learning_rate)
        self._set_betas(betas, count=3)
        self._set("eps", eps, lambda v: v >= 0, _non_negative("eps"))
        self._set("eps_root", eps_root, lambda v: v >= 0, _non_negative("eps_root"))
        self._set("weight_decay", weight_decay, lambda v: v >= 0, _non_negative("weight_decay"))
