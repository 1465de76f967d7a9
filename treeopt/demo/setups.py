"""The three optimizer set-ups the demo compares, on the same model, seed and batches.

- ``AdamW``: AdamW on everything, tuned (``benchmarks/outcome.py``): weight decay on the
  matrices, none on the vectors. Two groups, which torch param groups could do too.
- ``Muon everywhere``: the naive use of Muon: every matrix, the embeddings and the output head
  included, gets ``muon_adamw``'s Muon (vectors keep AdamW), as ``optax.contrib.muon`` does
  by default. treeopt's routing guards warn about it.
- ``muon_adamw``: :func:`treeopt.muon_adamw`: Muon on the hidden matrices of the blocks,
  the same tuned AdamW on the embeddings and the head, AdamW without decay on the vectors.

Every group has its own learning-rate schedule (a treeopt optimizer takes a schedule as its
learning rate): a linear warm-up then half a cosine to 0 at the last step. The AdamW groups
warm up over ``Hyper.warmup`` of the steps, the Muon group over ``Hyper.muon_warmup`` (Muon
is usually run with little or no warm-up); both fractions are swept. All three set-ups clip
the global gradient norm over all groups.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import treeopt as optim
from treeopt.filters import ndim
from treeopt.types import Schedule

if TYPE_CHECKING:
    import torch

    from treeopt.torch.optimizer import Optimizer as TorchOptimizer


@dataclass(frozen=True)
class Hyper:
    """The optimizer settings; the defaults are the best of the sweep in ``docs/outcome.md``
    (AdamW's peak lr and beta2; Muon's peak lr and weight decay, with that AdamW)."""

    adamw_lr: float = 8e-3
    beta2: float = 0.95
    #: AdamW's, on every matrix it gets, decoupled (w *= 1 - lr * wd)
    weight_decay: float = 0.1
    muon_lr: float = 0.04
    #: Muon's, decoupled too; per step it is muon_lr * wd, several times AdamW's at one wd
    muon_weight_decay: float = 0.1
    #: the AdamW groups' warm-up, a fraction of the steps (in every set-up)
    warmup: float = 0.4
    #: the Muon group's warm-up, a fraction of the steps (muon_adamw and the naive set-up)
    muon_warmup: float = 0.2
    #: Muon's recipe (``muon_adamw(variant=...)``, one of ``treeopt.presets.RECIPES``)
    muon_variant: str = "keller2024"
    max_grad_norm: float = 1.0

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


SETUPS = ("AdamW", "Muon everywhere", "muon_adamw")
DESCRIPTIONS = {
    "AdamW": "AdamW on every parameter, weight decay on the matrices (two groups)",
    "Muon everywhere": "Muon on every matrix, the embeddings and the head included; AdamW on the vectors",
    "muon_adamw": "treeopt.muon_adamw: Muon on the blocks' matrices, AdamW on the embeddings, head and vectors",
}


def warmup_cosine(peak: float, steps: int, warmup: float) -> Schedule:
    """A learning rate: linear from 0 to ``peak`` over ``warmup * steps`` steps, then half a
    cosine to 0 at ``steps``; without warm-up (``warmup * steps`` under one step), the cosine
    from the first step."""
    warm = round(warmup * steps)
    if warm < 1:
        return optim.cosine_decay(peak, steps)
    return optim.join_schedules(
        [optim.linear_schedule(0.0, peak, warm), optim.cosine_decay(peak, max(1, steps - warm))], [warm]
    )


def make(setup: str, model: torch.nn.Module, steps: int, hyper: Hyper = Hyper()) -> TorchOptimizer:
    """The optimizer of ``setup`` (one of :data:`SETUPS`) for ``model`` (a ``torch.nn.Module``):
    a ``torch.optim.Optimizer`` (:class:`treeopt.torch.Optimizer`) that routes the model's
    parameters now, by name and module type (``nn.Embedding``, the output ``nn.Linear``), so
    its plan can be shown and the guards warn before the first step."""
    import treeopt.torch  # torch: only the runs need it (the set-ups' routing does not)

    return treeopt.torch.Optimizer(model, routing(setup, steps, hyper))


def routing(setup: str, steps: int, hyper: Hyper = Hyper()) -> optim.MultiOptimizer:
    """The treeopt optimizer of ``setup``, before it meets a model."""
    betas = (0.9, hyper.beta2)
    adamw_lr = warmup_cosine(hyper.adamw_lr, steps, hyper.warmup)
    muon_lr = warmup_cosine(hyper.muon_lr, steps, hyper.muon_warmup)
    common: dict[str, Any] = {"max_grad_norm": hyper.max_grad_norm}
    if setup == "AdamW":
        optimizer = optim.MultiOptimizer(
            [
                optim.AdamW(adamw_lr, betas=betas, weight_decay=hyper.weight_decay, bias_correction=True),
                optim.AdamW(adamw_lr, betas=betas, weight_decay=0.0, bias_correction=True),
            ],
            [ndim(min=2)],
            names=["adamw", "adamw_no_decay"],
            **common,
        )
    elif setup == "Muon everywhere":
        # the same Muon as muon_adamw's (torch weights are (out, in)), given every matrix
        muon = optim.muon_adamw(
            muon_lr=muon_lr, muon_weight_decay=hyper.muon_weight_decay, layout="out_in", variant=hyper.muon_variant
        ).optimizers[0]
        optimizer = optim.MultiOptimizer(
            [muon, optim.AdamW(adamw_lr, betas=betas, weight_decay=0.0, bias_correction=True)],
            [ndim(min=2)],
            names=["muon", "adamw_no_decay"],
            **common,
        )
    elif setup == "muon_adamw":
        optimizer = optim.muon_adamw(
            muon_lr=muon_lr,
            adamw_lr=adamw_lr,
            betas=betas,
            weight_decay=hyper.weight_decay,
            muon_weight_decay=hyper.muon_weight_decay,
            layout="out_in",
            variant=hyper.muon_variant,
            **common,
        )
    else:
        raise ValueError(f"unknown set-up {setup!r}: expected one of {SETUPS}")
    return optimizer
