"""Canonical parameter names and module kinds of a torch model.

Wrappers change the names that ``named_parameters()`` gives: ``torch.compile`` puts
``_orig_mod.`` before every name, DDP and ``DataParallel`` put ``module.``, FSDP (1) and
activation checkpointing insert ``_fsdp_wrapped_module.`` and ``_checkpoint_wrapped_module.``.
treeopt routes and keys its state by the canonical name, the same with or without wrappers,
so a plan, a filter and a checkpoint written for the bare model fit the wrapped one.
"""

from __future__ import annotations

import torch

from treeopt._trees import WRAPPER_SEGMENTS, canonical_name
from treeopt.filters import (
    CONV,
    DEPTHWISE,
    EMBEDDING,
    EXPERTS,
    HEAD,
    IN_OUT,
    INPUT,
    LINEAR,
    NORM,
    OUTPUT,
    POINTWISE,
    repeated_blocks,
)

__all__ = ["canonical_name", "named_parameters", "module_kinds", "WRAPPER_SEGMENTS", "GUESSES", "IN_OUT"]


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


def _is_linear(module):
    """``nn.Linear``, or a module that stores one as ``(in, out)`` (Hugging Face's ``Conv1D``,
    GPT-2's layers)."""
    return isinstance(module, torch.nn.Linear) or _is_transposed_linear(module)


def _is_transposed_linear(module):
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _conv_kinds(conv):
    kinds = {CONV}
    if conv.groups > 1 and conv.groups == conv.in_channels:
        kinds.add(DEPTHWISE)
    elif all(k == 1 for k in conv.kernel_size):
        kinds.add(POINTWISE)
    return kinds


def module_kinds(model: torch.nn.Module) -> dict[str, frozenset[str]]:
    """``{canonical name: kinds}`` from the module types and their order (see
    :mod:`treeopt.filters`):

    - ``"embedding"``: the weight of an ``nn.Embedding`` or ``nn.EmbeddingBag``;
    - ``"norm"``: the parameters of normalisation layers (``LayerNorm``, ``GroupNorm``,
      batch and instance norms, and any module whose class name contains ``Norm``);
    - ``"linear"``, ``"conv"`` (with ``"depthwise"`` or ``"pointwise"`` for one filter per
      channel or a 1x1 kernel), ``"experts"`` (a module's own 3-D parameters: one matrix per
      expert), ``"in_out"`` (Hugging Face's ``Conv1D``, which stores ``(in, out)``, and the
      expert stacks transformers marks ``is_transposed``, stored ``(E, in, out)``);
    - ``"head"``: an ``nn.Linear`` whose weight is an embedding's (tied), and the last
      ``nn.Linear`` whose ``out_features`` is the largest embedding's ``num_embeddings``,
      outside the blocks the model repeats;
    - ``"input"``: the first layer in definition order when it is a linear or convolution (a
      stem; an embedding is found by its type); without an embedding, ``"output"`` for the
      last linear layer (a CNN's classifier, an MLP's last layer).

    ``"head"`` by vocabulary, ``"input"`` and ``"output"`` by order are guesses that
    :func:`treeopt.torch.trace.trace_kinds` (run by ``treeopt.torch.Optimizer`` on the first
    forward pass) replaces with what the pass shows.
    """
    kinds: dict = {}  # id(parameter) -> set of kinds

    def add(params, *names):
        for param in params:
            kinds.setdefault(id(param), set()).update(names)

    vocabularies, embedding_weights, linears, first = [], set(), [], None
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            add([module.weight], EMBEDDING)
            vocabularies.append(module.num_embeddings)
            embedding_weights.add(id(module.weight))
        elif _is_linear(module):
            linears.append(module)
            add([module.weight], LINEAR, *((IN_OUT,) if _is_transposed_linear(module) else ()))
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            add([module.weight], *_conv_kinds(module))
        elif _is_norm(module):
            add(own, NORM)
        else:  # transformers marks the expert stacks it stores (E, in, out) with is_transposed
            add(
                [p for p in own if p.dim() == 3],
                EXPERTS,
                *((IN_OUT,) if getattr(module, "is_transposed", 0) is True else ()),
            )
        if first is None and any(p.dim() >= 2 for p in own):
            first = module
    for linear in linears:
        if id(linear.weight) in embedding_weights:
            add(linear.parameters(recurse=False), HEAD)
    if vocabularies:
        weights = {id(linear.weight) for linear in linears}
        names = {id(param): name for name, param in named_parameters(model).items()}
        repeated = repeated_blocks(
            {name: tuple(param.shape) for name, param in named_parameters(model).items() if id(param) in weights}
        )
        heads = [
            linear
            for linear in linears
            if _out_features(linear) == max(vocabularies) and not repeated(names[id(linear.weight)])
        ]
        if heads:
            add(heads[-1].parameters(recurse=False), HEAD)
    if first is not None and (_is_linear(first) or isinstance(first, torch.nn.modules.conv._ConvNd)):
        if id(first.weight) not in embedding_weights:
            add([first.weight], INPUT)
    if not vocabularies and linears and linears[-1] is not first:  # a CNN, an MLP: the last linear
        add([linears[-1].weight], OUTPUT)
    return {name: frozenset(kinds[id(param)]) for name, param in named_parameters(model).items() if id(param) in kinds}


def _out_features(linear):
    return linear.nf if _is_transposed_linear(linear) else linear.out_features


#: the kinds of :func:`module_kinds` that are guesses from order and sizes, which a trace of
#: the forward pass replaces
GUESSES = frozenset({INPUT, HEAD, OUTPUT})
