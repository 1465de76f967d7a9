"""What MLX's modules tell routing about their parameters.

``treeopt`` is a drop-in for ``mlx.optimizers``: ``opt.update(model, grads)`` takes the
``mlx.nn.Module`` itself, so a :class:`~treeopt.MultiOptimizer` given one declares the kinds
found here before it routes (see :mod:`treeopt.filters`); ``muon_adamw(model)`` does too.

    import treeopt, treeopt.mlx
    treeopt.mlx.module_kinds(model)        # {"model.embed_tokens.weight": {"embedding"}, ...}

MLX has no hooks to follow a forward pass, so where a layer sits is read from its type and
the order in which the model defines its layers (the order of ``model.parameters()``).
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn

from treeopt.filters import (
    CONV,
    DEPTHWISE,
    EMBEDDING,
    EXPERTS,
    HEAD,
    INPUT,
    LINEAR,
    NORM,
    OUTPUT,
    POINTWISE,
    repeated_blocks,
)
from treeopt.tree import tree_flatten

__all__ = ["module_kinds", "is_module"]

_NORM = re.compile(r"Norm")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_module(tree: object) -> bool:
    """``tree`` is an ``mlx.nn.Module``."""
    return isinstance(tree, nn.Module)


def _own_arrays(module):
    return {name: value for name, value in module.items() if isinstance(value, mx.array)}


def _conv_kinds(conv):
    kinds = {CONV}
    weight = conv.weight  # (out, *kernel, in / groups)
    if weight.shape[-1] == 1 and weight.shape[0] > 1:
        kinds.add(DEPTHWISE)
    elif all(k == 1 for k in weight.shape[1:-1]):
        kinds.add(POINTWISE)
    return kinds


def module_kinds(model: nn.Module) -> dict[str, frozenset[str]]:
    """``{path: kinds}`` for the arrays of ``model``, paths as ``model.parameters()`` names them:

    - ``"embedding"``: the weight of an ``nn.Embedding`` (quantized too);
    - ``"norm"``: the arrays of a module whose class name contains ``Norm``;
    - ``"linear"``, ``"conv"`` (with ``"depthwise"``/``"pointwise"``), ``"experts"`` (the
      3-D weights of mlx-lm's ``SwitchLinear`` and other stacks of matrices);
    - ``"head"``: the last linear layer whose outputs are the largest vocabulary, outside the
      blocks the model repeats (a tied model, which calls ``embed.as_linear``, has none);
    - without an embedding (a CNN, an MLP): ``"input"`` for the first linear or convolution the
      model defines and ``"output"`` for the last linear.
    """
    modules = dict(model.named_modules())
    kinds: dict[str, set[str]] = {}
    vocabularies, linears, layers = [], [], []  # layers: (path of the weight, is a linear), in order
    shapes = {}  # of the linear and convolutional layers: which blocks repeat
    for path, _ in tree_flatten(model.parameters()):
        module_path, _, name = path.rpartition(".")
        module = modules.get(module_path)
        if module is None:
            continue
        own = _own_arrays(module)
        found = kinds.setdefault(path, set())
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            if name == "weight":
                found.add(EMBEDDING)
                vocabularies.append(module.weight.shape[0])
        elif _NORM.search(type(module).__name__):
            found.add(NORM)
        elif isinstance(module, (nn.Linear, nn.QuantizedLinear)) and name == "weight":
            found.add(LINEAR)
            linears.append((path, module.weight.shape[0]))
            layers.append((path, True))
            shapes[path] = module.weight.shape
        elif isinstance(module, _CONVS) and name == "weight":
            found |= _conv_kinds(module)
            layers.append((path, False))
            shapes[path] = module.weight.shape
        elif name in own and own[name].ndim == 3 and name != "bias":
            found.add(EXPERTS)
        if not found:
            del kinds[path]
    if vocabularies:
        repeated = repeated_blocks(shapes)
        heads = [path for path, outputs in linears if outputs == max(vocabularies) and not repeated(path)]
        if heads:
            kinds[heads[-1]].add(HEAD)
    elif layers:
        kinds[layers[0][0]].add(INPUT)
        last = [path for path, is_linear in layers if is_linear]
        if last and last[-1] != layers[0][0]:
            kinds[last[-1]].add(OUTPUT)
    return {path: frozenset(found) for path, found in kinds.items()}
