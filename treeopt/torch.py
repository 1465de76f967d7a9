"""treeopt in a PyTorch training loop.

    import treeopt as optim
    import treeopt.torch

    opt = treeopt.torch.Optimizer(model, optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(3e-4)],
        [lambda name, p: p.ndim == 2 and name.startswith("blocks.")]))
    for x, y in data:
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

Parameters are routed by their names in ``model.named_parameters()`` (``blocks.0.attn.weight``)
and updated in place under ``torch.no_grad()``; a parameter whose ``.grad`` is ``None`` or that
does not require grad is skipped (its state is kept). Tied weights (one tensor under two
names) are updated once, under the first name. State slots live on each parameter's device.
"""

import torch

from treeopt.optimizer import Optimizer as _Optimizer

__all__ = ["Optimizer"]

_COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts before every name


def _named_parameters(model):
    if isinstance(model, torch.nn.Module):
        named = model.named_parameters()  # de-duplicated: a tied tensor appears once
    else:
        named = list(model)
        if named and isinstance(named[0], torch.Tensor):
            named = [(str(i), p) for i, p in enumerate(named)]
    result, seen = {}, set()
    for name, param in named:
        if id(param) in seen:
            continue
        seen.add(id(param))
        result[name.replace(_COMPILED_PREFIX, "")] = param
    return result


class Optimizer:
    """A torch.optim-style front for a treeopt optimizer.

    Args:
        model: a ``torch.nn.Module`` (``torch.compile``d or not), or an iterable of
            ``(name, parameter)`` pairs, or of parameters (named ``"0"``, ``"1"``...).
        optimizer: any treeopt optimizer, e.g. a ``MultiOptimizer``.
    """

    def __init__(self, model, optimizer: _Optimizer, sharding: str = None, process_group=None):
        if not isinstance(optimizer, _Optimizer):
            raise TypeError(f"expected a treeopt optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.parameters = _named_parameters(model)
        if not self.parameters:
            raise ValueError("treeopt.torch.Optimizer got no parameters")
        # sharding="zero1": each rank keeps the state of the parameters it owns (see
        # treeopt.distributed); None: every rank (if any) keeps all of it, as in one process
        from treeopt.distributed import attach

        self._distributed = attach(self, sharding, process_group, model if isinstance(model, torch.nn.Module) else None)

    def __repr__(self):
        return f"treeopt.torch.Optimizer({len(self.parameters)} parameters, {self.optimizer!r})"

    def _trainable(self):
        return {name: p for name, p in self.parameters.items() if p.requires_grad}

    def init(self):
        """Create the state of every trainable parameter now (it is otherwise created at the
        first step)."""
        with torch.no_grad():
            if self._distributed is not None:
                self._distributed.init()
            else:
                self.optimizer.init(self._trainable())

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every parameter that has a gradient. ``closure`` (optional)
        re-evaluates the model and returns the loss, as in torch.optim."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._trainable()
        if self._distributed is not None:
            self._distributed.step({name: p.grad for name, p in params.items()})
        else:
            self.optimizer.update(params, {name: p.grad for name, p in params.items()})
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for p in self.parameters.values():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    def plan(self):
        """The routing plan of every trainable parameter (see :meth:`treeopt.Optimizer.plan`);
        under ``sharding="zero1"`` with an owner column and per-rank totals."""
        if self._distributed is not None and hasattr(self._distributed, "plan"):
            return self._distributed.plan()
        with torch.no_grad():
            return self.optimizer.plan(self._trainable())

    @property
    def state(self):
        """The treeopt state, keyed by parameter name."""
        return self.optimizer.state

    def state_dict(self):
        """The optimizer state keyed by parameter name and slot (``"blocks.0.attn.weight/m"``),
        with the metadata that lets :meth:`load_state_dict` check it (one JSON string): see
        :mod:`treeopt.checkpoint`. Plain tensors and a string, so ``torch.save`` and
        ``torch.distributed.checkpoint`` can store it."""
        from treeopt import checkpoint

        if self._distributed is not None:
            return self._distributed.state_dict()
        from treeopt.distributed.state import encode

        self.init()  # every slot exists, in torch: a load target for torch.distributed.checkpoint
        tensors, metadata = checkpoint.to_flat(self.optimizer, known=list(self._trainable()))
        return {"tensors": tensors, "metadata": encode(metadata)}

    def load_state_dict(self, state_dict, strict: bool = True):
        """Load a state saved by :meth:`state_dict` (or any treeopt checkpoint's content),
        matched by parameter name, never by position. Returns the load report."""
        from treeopt import checkpoint

        if self._distributed is not None:
            return self._distributed.load_state_dict(state_dict, strict=strict)
        from treeopt.distributed.state import decode

        self.init()
        return checkpoint.from_flat(self.optimizer, state_dict["tensors"], decode(state_dict["metadata"]), strict=strict)
