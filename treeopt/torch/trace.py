"""What one forward pass tells about each parameter of a torch model.

Names and module types say what a layer is; only the order in which tensors flow says where it
sits. While one forward pass runs, a ``TorchFunctionMode`` follows every tensor: which
parameters it was made from by elementwise work alone (its *lineage*), whether it depends on any
parameter, whether it is the model's input, and which matrix products last wrote it (its
*sources*). From that:

- ``"input"``: the weight of a product (a linear map, a convolution, an embedding lookup) whose
  data does not depend on any parameter: the layer that reads the input (a stem, an audio front
  end, the first layer of an MLP);
- ``"output"``: the weight of a product that writes the model's output (its logits when it has
  some) with only elementwise work after it: the output layer, whatever it is called;
- ``"hidden"``: the weight of a product that is neither: a layer inside the network, which
  names such as ``decoder_embed`` or ``head.dense`` must not send to AdamW;
- ``"gain"``: a parameter the pass used, never as the weight of a product (state-space decays,
  position tables, mixing coefficients), whatever its shape.

A weight is a product's operand made from parameters alone (a ``weight.t()``, a slice of an
expert stack, a weight-normalised kernel). Nothing is changed: the pass computes what it would
have computed.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from treeopt.filters import GAIN, HIDDEN, INPUT, OUTPUT
from treeopt.torch.names import canonical_name

__all__ = ["trace_kinds", "Trace"]

_F = torch.nn.functional
#: products whose operands made from parameters alone are weight matrices
_PRODUCTS = {
    _F.linear,
    _F.bilinear,
    _F.conv1d,
    _F.conv2d,
    _F.conv3d,
    _F.conv_transpose1d,
    _F.conv_transpose2d,
    _F.conv_transpose3d,
    _F.multi_head_attention_forward,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.einsum,
    torch.addmm,
    torch.baddbmm,
    torch.addbmm,
    torch.tensordot,
    torch.Tensor.matmul,
    torch.Tensor.mm,
    torch.Tensor.bmm,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
}
#: the names of other products (grouped GEMMs of MoE layers, custom ops, new functions)
_PRODUCT_NAMES = re.compile(r"(^|_)(grouped_mm|mm|bmm|matmul|addmm|baddbmm|linear|einsum|conv\w*|tensordot)(_|$)")


def _is_product(func: Any) -> bool:
    return func in _PRODUCTS or bool(_PRODUCT_NAMES.search(str(getattr(func, "__name__", ""))))


#: lookups: the table is read at the data's indices (an embedding layer)
_LOOKUPS = {_F.embedding, torch.embedding, _F.embedding_bag}
#: new tensors that only borrow another's shape
_FRESH = {
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.rand_like,
    torch.randn_like,
    torch.Tensor.new_zeros,
    torch.Tensor.new_ones,
    torch.Tensor.new_empty,
    torch.Tensor.new_full,
}


def _tensors(node: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(node, torch.Tensor):
        yield node
    elif depth < 3 and isinstance(node, (list, tuple)):
        for child in node:
            yield from _tensors(child, depth + 1)
    elif depth < 3 and isinstance(node, dict):
        for child in node.values():
            yield from _tensors(child, depth + 1)


class _Info:
    __slots__ = ("lineage", "depends", "data", "sources")

    def __init__(
        self,
        lineage: frozenset = frozenset(),
        depends: bool = False,
        data: bool = False,
        sources: frozenset = frozenset(),
    ) -> None:
        #: parameters it was made from by elementwise work alone
        self.lineage = lineage
        #: it depends on some parameter
        self.depends = depends
        #: it depends on the model's input
        self.data = data
        #: the weights of the products that last wrote it
        self.sources = sources


class Trace(TorchFunctionMode):
    """Follows the tensors of one forward pass (see the module's docstring)."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names  # id(parameter) -> name
        self.info: dict[int, tuple[weakref.ref, _Info]] = {}
        self.inputs: set[int] = set()
        self.matrices: set[str] = set()  # used as the weight of a product
        self.tables: set[str] = set()  # looked up (an embedding's table)
        self.used: set[str] = set()
        self.read_input: set[str] = set()
        self.failed: BaseException | None = None

    def mark_inputs(self, args: Any, kwargs: dict) -> None:
        self.inputs = {id(t) for t in _tensors((args, kwargs))}

    def _of(self, tensor):
        name = self.names.get(id(tensor))
        if name is not None:
            self.used.add(name)
            return _Info(frozenset([name]), True)
        entry = self.info.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        return _Info(data=id(tensor) in self.inputs)

    def _set(self, tensor, info):
        if id(tensor) not in self.names:
            self.info[id(tensor)] = (weakref.ref(tensor), info)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.failed is None:
            try:
                self._record(func, args, kwargs, out)
            except Exception as error:  # the analysis gives up; the model's pass goes on
                self.failed = error
        return out

    def _record(self, func, args, kwargs, out):
        if func in _FRESH:
            return
        tensors = list(_tensors((args, kwargs)))
        if not tensors:
            return
        results = list(_tensors(out))
        product = _is_product(func)
        if product or func in _LOOKUPS:
            operands = [self._of(t) for t in tensors]
            weights = [o for o in operands if o.lineage and not o.data]
            readers = [o for o in operands if not (o.lineage and not o.data)]
            reads_input = any(o.data for o in readers) and not any(o.depends for o in readers)
            for weight in weights:
                if product:
                    self.matrices |= weight.lineage
                else:
                    self.tables |= weight.lineage
                if reads_input:
                    self.read_input |= weight.lineage
            info = _Info(
                frozenset(),
                True,
                any(o.data for o in operands),
                frozenset().union(*(w.lineage for w in weights)) or frozenset().union(*(o.sources for o in operands)),
            )
        else:  # elementwise work, indexing, reshaping: indices and masks carry nothing
            operands = [self._of(t) for t in tensors if t.is_floating_point() or t.is_complex()]
            if not operands:
                return
            info = _Info(
                frozenset().union(*(o.lineage for o in operands)),
                any(o.depends for o in operands),
                any(o.data for o in operands),
                frozenset().union(*(o.sources for o in operands)),
            )
        for result in results:
            self._set(result, info)

    def outputs(self, out: Any) -> set[str]:
        """The weights of the layers that write ``out`` (its logits and loss when it has some)."""
        chosen = out
        if isinstance(out, dict):  # transformers' ModelOutput: what a loss is computed from
            keys = [k for k in out if k == "loss" or "logits" in str(k)]
            if keys:
                chosen = [out[k] for k in keys]
        elif hasattr(out, "__dataclass_fields__"):
            chosen = list(vars(out).values())
        sources: set[str] = set()
        for tensor in _tensors(chosen):
            sources |= self._of(tensor).sources
        return sources

    def kinds(self, out: Any) -> dict[str, frozenset[str]]:
        """``{parameter name: kinds}`` once the pass has returned ``out``."""
        outputs = self.outputs(out)
        kinds = {}
        for name in self.used:
            found = set()
            if name in self.read_input:
                found.add(INPUT)
            if name in outputs:
                found.add(OUTPUT)
            if name in self.matrices and not found:
                found.add(HIDDEN)
            if not (name in self.matrices or name in self.read_input or name in self.tables):
                found.add(GAIN)
            kinds[name] = frozenset(found)
        return kinds


def _names(model: torch.nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, param in model.named_parameters():
        names.setdefault(id(param), canonical_name(name))
    return names


def trace_kinds(model: torch.nn.Module, *args: Any, **kwargs: Any) -> dict[str, frozenset[str]]:
    """Run ``model(*args, **kwargs)`` once and return ``{canonical name: kinds}`` from what
    flowed where (see the module's docstring). Gradients are recorded as in any forward pass;
    nothing else changes."""
    trace = Trace(_names(model))
    trace.mark_inputs(args, kwargs)
    with trace:
        out = model(*args, **kwargs)
    if trace.failed is not None:
        raise RuntimeError(f"treeopt could not follow the forward pass: {trace.failed!r}") from trace.failed
    return trace.kinds(out)


class FirstForward:
    """Follows the model's first forward pass run with gradients on, then calls
    ``learned(kinds)`` and removes itself. A pass that cannot be followed (a compiled model,
    an error in the analysis) leaves the kinds known before."""

    def __init__(self, model: torch.nn.Module, learned: Callable[[dict[str, frozenset[str]]], None]) -> None:
        self.model, self.learned = model, learned
        self.trace: Trace | None = None
        self.handles = [
            model.register_forward_pre_hook(self._start, with_kwargs=True),
            model.register_forward_hook(self._finish, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _start(self, module, args, kwargs):
        if self.trace is not None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        self.trace = Trace(_names(self.model))
        self.trace.mark_inputs(args, kwargs)
        self.trace.__enter__()
        return None

    def _finish(self, module, args, output):
        trace = self.trace
        if trace is None:
            return None
        trace.__exit__(None, None, None)
        self.remove()
        if trace.failed is None:
            self.learned(trace.kinds(output))
        return None
