"""Ready-made MultiOptimizers for common recipes."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from treeopt._trees import canonical_name
from treeopt.backends import backend_of
from treeopt.filters import is_bias, is_gain, is_hidden_matrix, is_norm
from treeopt.multi import MultiOptimizer
from treeopt.optimizers import AdamW, Muon
from treeopt.precision import StatePrecision
from treeopt.tree import is_container, tree_flatten
from treeopt.types import Filter, Scalar, Schedule, Tree

__all__ = ["RECIPES", "muon_adamw"]

#: the defaults of Keller Jordan's reference Muon (github.com/KellerJordan/Muon, README "Usage"):
#: Muon lr=0.02, momentum=0.95, decoupled weight_decay=0.01, eps=1e-7 in Newton-Schulz; the
#: auxiliary AdamW lr=3e-4, betas=(0.90, 0.95), weight_decay=0.01 (PyTorch's AdamW, hence bias
#: correction)
MUON_LR, MUON_MOMENTUM, NS_EPS = 0.02, 0.95, 1e-7
ADAMW_LR, ADAMW_BETAS, WEIGHT_DECAY = 3e-4, (0.9, 0.95), 0.01

#: Muon's variant options of each named recipe of ``muon_adamw(variant=...)``
RECIPES: dict[str, dict[str, Any]] = {
    # Keller Jordan's Muon (github.com/KellerJordan/Muon): one Newton-Schulz triple, eps 1e-7
    "keller2024": {},
    # nanochat's Muon (karpathy/nanochat, nanochat/optim.py): Polar Express normalised by 1.01
    # of the norm plus 1e-6, MuonEq rows, Muon+ renormalisation, NorMuon over the longer side
    # with beta2 0.9, cautious weight decay
    "nanochat": dict(
        ns_coefficients="polar_express",
        ns_safety=1.01,
        ns_eps=1e-6,
        row_equilibration=True,
        renormalization=True,
        normuon="larger",
        normuon_beta2=0.9,
        cautious_weight_decay=True,
    ),
}
#: the recipe muon_adamw runs unless told otherwise
DEFAULT_RECIPE = "keller2024"


def layout_of(params: Tree) -> str | None:
    """``"in_out"`` when the matrices of ``params`` are named ``kernel`` (flax, Keras: output
    axis last), ``"out_in"`` when they are named ``weight`` (torch, MLX, equinox) or ``params``
    is an equinox module, else None."""
    if not is_container(params):
        return "out_in" if type(params).__module__.startswith("equinox") or _is_equinox(params) else None
    names = {path.rsplit(".", 1)[-1] for path, leaf in tree_flatten(params) if len(getattr(leaf, "shape", ())) >= 2}
    if "kernel" in names and "weight" not in names:
        return "in_out"
    if "weight" in names and "kernel" not in names:
        return "out_in"
    return None


def _is_equinox(tree):
    if "equinox" not in sys.modules:
        return False
    from treeopt.jax import is_equinox  # JAX only when an equinox module is given

    return is_equinox(tree)


def canonical(params: Tree) -> Tree:
    """``params`` keyed by canonical names when it is a dict of torch tensors named by a
    wrapper (``dict(torch.compile(model).named_parameters())``: ``_orig_mod.`` removed), so its
    routes are the ones ``treeopt.torch.Optimizer`` uses."""
    if not isinstance(params, dict):
        return params
    if any(canonical_name(str(k)) != k for k in params) and all(
        type(v).__module__.startswith("torch") for v in params.values()
    ):
        return {canonical_name(k): v for k, v in params.items()}
    return params


def _routable(multi: MultiOptimizer, params: Tree) -> Tree:
    """``params`` as routing walks it. A tree of JAX arrays first gets the kinds that flax's and
    equinox's modules give its parameters declared (:func:`treeopt.jax.module_kinds`); one that
    is no dict, list or tuple (an ``nnx.State``, an equinox module) or holds flax's boxed leaves
    (``LogicallyPartitioned``) becomes ``{path: array}``, named as :mod:`treeopt.jax` names
    them, so the routes are those its ``init`` and ``update`` use."""
    plain = is_container(params) and not any(
        type(leaf).__module__.startswith("flax") for _, leaf in tree_flatten(params, is_leaf=_is_box)
    )
    if plain:
        leaves = tree_flatten(params)
        if not leaves or getattr(backend_of(leaves[0][1]), "name", None) != "jax":
            return params
    elif "jax" not in sys.modules:
        return params
    # JAX loads only for a tree of JAX arrays or a JAX pytree
    from treeopt import jax as treeopt_jax

    treeopt_jax.declare_kinds(multi, params)
    return params if plain else treeopt_jax.named_leaves(params)


def _is_box(node: Any) -> bool:
    """A leaf that is not a container: flax's boxes (``LogicallyPartitioned``) included."""
    return not is_container(node)


def muon_adamw(
    params: Tree | None = None,
    *,
    muon_lr: Scalar | None = None,
    adamw_lr: Scalar = ADAMW_LR,
    momentum: Scalar = MUON_MOMENTUM,
    betas: tuple[Scalar, Scalar] = ADAMW_BETAS,
    weight_decay: Scalar = WEIGHT_DECAY,
    muon_weight_decay: Scalar | None = None,
    adjust_lr: str = "original",
    layout: str | None = None,
    ns_dtype: str | None = None,
    hidden: Filter = is_hidden_matrix,
    no_decay: Filter = is_bias | is_norm | is_gain,
    frozen: Filter | None = None,
    lr_schedule: Schedule | None = None,
    state_dtype: str | StatePrecision | Mapping[str, str | StatePrecision | None] | None = None,
    print_plan: bool = False,
    variant: str = DEFAULT_RECIPE,
    **options: Any,
) -> MultiOptimizer:
    """Muon for the hidden matrices, AdamW for the rest: Keller Jordan's recipe (the Muon
    paper, the NanoGPT speedruns), as one :class:`MultiOptimizer` with three named groups.

    - ``muon``: matrices that are neither embeddings nor output heads (``hidden``):
      ``Muon(muon_lr, momentum, muon_weight_decay, decoupled_weight_decay=True, ns_eps=1e-7,
      adjust_lr=adjust_lr)``. Unlike a bare :class:`Muon` (MLX's coupled decay, for drop-in
      fidelity), the decay is decoupled, ``p <- p * (1 - lr * weight_decay)``, as in the
      reference: a coupled decay passes through Newton-Schulz and is amplified to the full
      learning rate.
    - ``adamw_no_decay``: biases, normalisation weights and other vectors (``no_decay``):
      AdamW without weight decay.
    - ``adamw``: everything else (embeddings, the head): AdamW with weight decay.

    The learning rate of a Muon matrix is scaled by its shape (``adjust_lr``):

    - ``"original"`` (default): ``sqrt(max(1, rows / cols))``, Keller Jordan's; Muon's
      learning rate is its own (``muon_lr`` defaults to 0.02, AdamW's to 3e-4).
    - ``"match_rms_adamw"``: ``0.2 * sqrt(max(rows, cols))``, Moonlight's (Liu et al., 2025):
      the update then has AdamW's typical RMS, so one learning rate serves both families
      (``muon_lr`` defaults to ``adamw_lr``).

    Args:
        params: the model's parameters; when given they are routed now, so the plan can be
            printed and checked before the first step.
        muon_lr, adamw_lr: peak learning rates of the two families; their ratio is kept by
            ``lr_schedule``. ``muon_lr`` defaults as said above.
        momentum: Muon's momentum. betas: AdamW's betas. weight_decay: for ``muon`` and
            ``adamw``, decoupled in both. muon_weight_decay: the ``muon`` group's own, when
            it should differ (default ``weight_decay``): the decay per step is ``lr * wd``,
            and Muon's learning rate is several times AdamW's.
        adjust_lr: ``"original"`` or ``"match_rms_adamw"`` (see above).
        layout: Muon's ``layout``: ``"out_in"`` (torch, MLX, equinox: ``weight`` of shape
            ``(out, in)``) or ``"in_out"`` (flax, Keras: ``kernel`` of shape ``(in, out)``).
            Default: read from ``params`` when given (matrices named ``kernel`` are flax's,
            ``weight`` torch's), else Muon's own default (see :class:`Muon`).
        ns_dtype: Muon's Newton-Schulz dtype, e.g. ``"bfloat16"`` on GPUs, as Keller Jordan
            and ``torch.optim.Muon`` run it (default: the gradient's dtype; see :class:`Muon`).
        hidden, no_decay: the filters of the first two groups (see :mod:`treeopt.filters`).
        frozen: a filter of parameters that no group gets.
        lr_schedule: a multiplier of the step for every group's learning rate (warm-up,
            decay), e.g. ``join_schedules([linear_schedule(0, 1, 100), cosine_decay(1, 900)], [100])``.
        state_dtype: how every group stores its state (``None``: the parameters' dtype;
            ``"float32"``, ``"bfloat16"``, ``"int8"``: see ``docs/precision.md``), or a dict
            by group name, e.g. ``{"muon": "bfloat16", "adamw": "int8"}`` (groups not named
            keep ``None``).
        print_plan: print the routing plan (needs ``params``), after a line naming the recipe.
        variant: Muon's recipe, one of :data:`RECIPES`: ``"keller2024"`` (the default: Keller
            Jordan's Newton-Schulz) or ``"nanochat"`` (Polar Express, MuonEq, Muon+, NorMuon
            and cautious weight decay, as nanochat runs them; ``docs/muon.md``).
        options: other :class:`MultiOptimizer` options (``max_grad_norm``,
            ``skip_nonfinite``, ``accumulate``, ``on_unmatched``, ``guards``).

    Example:
        >>> import numpy as np, treeopt
        >>> params = {"embed": np.ones((100, 16), np.float32),
        ...           "blocks": [{"w": np.ones((16, 16), np.float32), "b": np.zeros(16, np.float32)}],
        ...           "lm_head": {"weight": np.ones((100, 16), np.float32)}}
        >>> opt = treeopt.muon_adamw(params)
        >>> [opt.names[opt.route(p)] for p in ("blocks.0.w", "blocks.0.b", "embed", "lm_head.weight")]
        ['muon', 'adamw_no_decay', 'adamw', 'adamw']
    """
    if variant not in RECIPES:
        raise ValueError(f"muon_adamw variant should be one of {tuple(RECIPES)}, {variant!r} was provided instead")
    recipe = {"ns_eps": NS_EPS, **RECIPES[variant]}
    if muon_lr is None:
        muon_lr = adamw_lr if adjust_lr == "match_rms_adamw" else MUON_LR
    if muon_weight_decay is None:
        muon_weight_decay = weight_decay
    if params is not None:
        params = canonical(params)
    if layout is None and params is not None:
        layout = layout_of(params)
    names = ["muon", "adamw_no_decay", "adamw"]
    if isinstance(state_dtype, Mapping):
        unknown = sorted(set(state_dtype) - set(names))
        if unknown:
            raise ValueError(f"muon_adamw state_dtype names groups {unknown}; the groups are {names}")
        dtypes = [state_dtype.get(name) for name in names]
    else:
        dtypes = [state_dtype] * len(names)
    multi = MultiOptimizer(
        [
            Muon(
                muon_lr,
                momentum=momentum,
                weight_decay=muon_weight_decay,
                decoupled_weight_decay=True,
                adjust_lr=adjust_lr,
                layout=layout,
                ns_dtype=ns_dtype,
                state_dtype=dtypes[0],
                **recipe,
            ),
            AdamW(adamw_lr, betas=betas, weight_decay=0.0, bias_correction=True, state_dtype=dtypes[1]),
            AdamW(adamw_lr, betas=betas, weight_decay=weight_decay, bias_correction=True, state_dtype=dtypes[2]),
        ],
        [hidden, no_decay],
        names=names,
        frozen=frozen,
        lr_schedule=lr_schedule,
        **options,
    )
    if params is not None:
        plan = multi.plan(_routable(multi, params))
        if print_plan:
            print(f"muon_adamw: Muon's recipe {variant!r}")
            plan.print()
    elif print_plan:
        raise ValueError("muon_adamw(print_plan=True) needs the params")
    return multi
