"""Canonical parameter names and module kinds of a torch model.

Wrappers change the names that ``named_parameters()`` gives: ``torch.compile`` puts
``_orig_mod.`` before every name, DDP and ``DataParallel`` put ``module.``, FSDP (1) and
activation checkpointing insert ``_fsdp_wrapped_module.`` and ``_checkpoint_wrapped_module.``.
treeopt routes and keys its state by the canonical name, the same with or without wrappers,
so a plan, a filter and a checkpoint written for the bare model fit the wrapped one.
"""

from __future__ import annotations

import torch

__all__ = ["canonical_name", "named_parameters", "module_kinds", "WRAPPER_SEGMENTS"]

#: name segments that only wrappers insert (torch.compile, FSDP, activation checkpointing)
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
#: DDP and DataParallel hold the model as ``.module``: leading ``module`` segments are theirs
_DATA_PARALLEL = "module"


def canonical_name(name: str) -> str:
    """``name`` without the segments wrappers insert: ``"module._orig_mod.blocks.0.weight"``
    -> ``"blocks.0.weight"``. Wrapper segments go wherever they are; ``module`` segments only
    at the start (where DDP puts them), so a bare model whose root has a child named
    ``module`` gets the same names as under DDP."""
    segments = [s for s in name.split(".") if s not in WRAPPER_SEGMENTS]
    while len(segments) > 1 and segments[0] == _DATA_PARALLEL:
        segments.pop(0)
    return ".".join(segments)


def named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``{canonical name: parameter}`` of a module, each tensor once (a tied weight under its
    first name), in ``model.named_parameters()`` order."""
    result: dict = {}
    names: dict = {}
    for name, param in model.named_parameters():  # de-duplicated by identity
        canonical = canonical_name(name)
        if canonical in result:
            raise ValueError(
                f"parameters {names[canonical]!r} and {name!r} have the same canonical name "
                f"{canonical!r}; rename one of them"
            )
        result[canonical], names[canonical] = param, name
    return result


def _is_norm(module):
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)
    return isinstance(module, norms) or "norm" in type(module).__name__.lower()  # RMSNorm, LlamaRMSNorm...


def module_kinds(model: torch.nn.Module) -> dict[str, frozenset[str]]:
    """``{canonical name: kinds}`` from the module types (see :mod:`treeopt.filters`):

    - ``"embedding"``: the weight of an ``nn.Embedding`` or ``nn.EmbeddingBag``;
    - ``"head"``: the parameters of an ``nn.Linear`` whose weight is an embedding's (tied), and of
      the last ``nn.Linear`` whose ``out_features`` is an embedding's ``num_embeddings``;
    - ``"norm"``: the parameters of normalisation layers (``LayerNorm``, ``GroupNorm``,
      batch and instance norms, and any module whose class name contains ``Norm``).
    """
    kinds: dict = {}  # id(parameter) -> set of kinds

    def add(params, kind):
        for param in params:
            kinds.setdefault(id(param), set()).add(kind)

    vocabularies, embedding_weights, linears = set(), set(), []
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            add([module.weight], "embedding")
            vocabularies.add(module.num_embeddings)
            embedding_weights.add(id(module.weight))
        elif isinstance(module, torch.nn.Linear):
            linears.append(module)
        elif _is_norm(module):
            add(module.parameters(recurse=False), "norm")
    for linear in linears:
        if id(linear.weight) in embedding_weights:
            add(linear.parameters(recurse=False), "head")
    heads = [linear for linear in linears if linear.out_features in vocabularies]
    if heads:
        add(heads[-1].parameters(recurse=False), "head")
    return {name: frozenset(kinds[id(param)]) for name, param in named_parameters(model).items() if id(param) in kinds}
