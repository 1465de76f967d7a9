"""A stackable rule (Muon) over same-shape groups of torch tensors, replayed as a CUDA graph.

Muon's step is a few dozen small operations per group of same-shape matrices (stacking,
Newton-Schulz's batched products, the write-back): on a GPU, launching them costs the host
more than the device spends running them. :class:`StackedStep` runs the rule once per group on
stacked buffers (as :func:`treeopt.engine.run_stacked` does) and, after two eager steps,
captures everything after the gradients' gathering as one CUDA graph, replayed at every later
step: the host then launches one gather per group, one small copy and the replay.

- The gradients are copied into fixed stacks *before* the replay (their addresses change from
  step to step; the parameters' and slots' do not).
- Numeric coefficients (learning rate, momentum, the decay) live in a small device tensor
  refreshed from pinned memory at every step, so a schedule never invalidates the graph; the
  others (switches, step counts of Newton-Schulz, dtypes) are part of the graph's key, and a new
  key captures anew.
- Capture is tried once per key; any error there (an operation CUDA graphs refuse, a driver
  without support) leaves the step eager, with the same numbers. Off CUDA (CPU tests) the step
  is always eager: everything but the capture call runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from treeopt.backends.torch_backend import TorchBackend

_BACKEND = TorchBackend()
#: eager steps before the capture (cuBLAS and the caching allocator set themselves up)
WARM_UP = 2


class StackedStep:
    """``step(grads, coefficients)``: ``update(..., stacked=True)`` on each group of
    same-shape tensors (``groups``: lists of indices into ``params``), in place.

    ``slots`` holds one list of tensors per slot name, in the order of ``params``; ``None``
    where a tensor has no such slot (NorMuon's second moment is a matrix's only). A slot may
    have its own shape; the tensors of a group have the same slots, of the same shapes."""

    def __init__(
        self,
        update: Callable[..., tuple[Any, ...]],
        groups: Sequence[Sequence[int]],
        params: Sequence[torch.Tensor],
        slots: Sequence[Sequence[torch.Tensor]],
    ) -> None:
        self.update, self.groups = update, [list(g) for g in groups]
        self.params, self.slots = list(params), [list(s) for s in slots]
        like = params[0]
        self.capture = like.device.type == "cuda"
        self.grad_stacks = [
            torch.empty((len(g),) + tuple(params[g[0]].shape), dtype=like.dtype, device=like.device) for g in groups
        ]
        # per group: the slots its tensors have, and the stacks of its parameters and of each slot
        self.present = [[slot for slot in self.slots if slot[g[0]] is not None] for g in self.groups]
        self.stacks = [
            [torch.empty_like(stack)]
            + [
                torch.empty((len(g),) + tuple(slot[g[0]].shape), dtype=like.dtype, device=like.device)
                for slot in present
            ]
            for g, stack, present in zip(self.groups, self.grad_stacks, self.present)
        ]
        self.key: tuple[Any, ...] | None = None
        self.graph: Any = None
        self.eager_steps = 0
        self.param_ptrs = [p.data_ptr() for p in self.params]

    def __call__(self, grads: Sequence[torch.Tensor], coefficients: dict[str, Any]) -> None:
        numeric = sorted(n for n, v in coefficients.items() if _is_number(v))
        static = tuple((n, v) for n, v in sorted(coefficients.items()) if n not in numeric)
        key = (tuple(numeric), static, tuple(p.data_ptr() for p in self.params))
        if key != self.key:  # new switches, a new kind of hyper-parameter, moved parameters
            self.key, self.graph, self.eager_steps = key, None, 0
            like = self.params[0]
            self.scalars = torch.zeros(len(numeric), dtype=like.dtype, device=like.device)
            self.names, self.static = numeric, dict(static)
        values = torch.tensor([float(coefficients[n]) for n in self.names], dtype=self.scalars.dtype)
        with torch.no_grad():
            if self.scalars.device.type == "cuda":
                # from pinned memory the copy is queued like a kernel: the host never waits
                self.scalars.copy_(values.pin_memory(), non_blocking=True)
            else:
                self.scalars.copy_(values)
            for group, stack in zip(self.groups, self.grad_stacks):
                torch.stack([grads[i] for i in group], out=stack)
            if self.graph is not None:
                self.graph.replay()
                return
            if self.capture and self.eager_steps >= WARM_UP:
                self._capture()
                if self.graph is not None:
                    self.graph.replay()
                    return
            self._body()
            self.eager_steps += 1

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()  # once per key: the capture must not see unfinished work
            with torch.cuda.graph(graph):
                self._body()
        except Exception:  # refused by CUDA graphs: this key stays eager, with the same numbers
            self.capture = False
            return
        self.graph = graph

    def _body(self) -> None:
        """The rule on the stacks, written back: what the graph replays."""
        coefficients = dict(self.static)
        coefficients.update({n: self.scalars[k] for k, n in enumerate(self.names)})
        for group, grad_stack, stacks, present in zip(self.groups, self.grad_stacks, self.stacks, self.present):
            param_stack, slot_stacks = stacks[0], stacks[1:]
            torch.stack([self.params[i] for i in group], out=param_stack)
            for slot, stack in zip(present, slot_stacks):
                torch.stack([slot[i] for i in group], out=stack)
            with _BACKEND.quiet():
                new_param, *new_slots = self.update(grad_stack, param_stack, *slot_stacks, **coefficients, stacked=True)
            for slot, value in zip(present, new_slots):
                _BACKEND.write_stack([slot[i] for i in group], value)
            _BACKEND.write_stack([self.params[i] for i in group], new_param)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, float) or (
        isinstance(value, torch.Tensor) and value.ndim == 0 and value.is_floating_point()
    )
