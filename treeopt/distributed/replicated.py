"""DDP: every rank has the averaged gradients and the whole state, and steps as one process.

Nothing changes in the step. What is added is a check, once, after the first step: every
rank routed the same parameters to the same optimizers and counts the same step (a filter
that depends on the rank, or a rank that skipped a step, would otherwise drift silently).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from treeopt.checkpoint.base import numpy_scalar
from treeopt.distributed.comm import Collectives
from treeopt.distributed.fsdp import check_current
from treeopt.distributed.state import agreed, decode, encode, local_tensors

if TYPE_CHECKING:
    import torch.distributed as dist

    from treeopt.checkpoint.format import LoadReport
    from treeopt.optimizer import Optimizer

__all__ = ["Replicated"]


class Replicated:
    def __init__(
        self,
        optimizer: Optimizer,
        parameters: Mapping[str, torch.Tensor],
        group: dist.ProcessGroup | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.optimizer, self.parameters, self.model = optimizer, dict(parameters), model
        self.comm = Collectives(group, next(iter(self.parameters.values())).device)
        self.checked = False

    def init(self) -> None:
        self.optimizer.init(self.parameters)

    def step(self, gradients: Mapping[str, torch.Tensor | None]) -> None:
        if not self.checked:
            check_current(self.model, self.parameters)
        self.optimizer.update(self.parameters, gradients)
        if not self.checked:
            self.checked = True
            agreed(self.comm, "routes and step", _routes_and_step(self.optimizer, self.parameters))

    def state_dict(self) -> dict[str, Any]:
        from treeopt import checkpoint

        with torch.no_grad():
            self.init()  # every slot exists: a load target for torch.distributed.checkpoint
        tensors, metadata = checkpoint.to_flat(self.optimizer, known=list(self.parameters))
        return {"tensors": tensors, "metadata": encode(agreed(self.comm, "checkpoint metadata", metadata))}

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, check_hyperparameters: bool = True
    ) -> LoadReport:
        from treeopt import checkpoint

        with torch.no_grad():
            self.init()
            return checkpoint.from_flat(
                self.optimizer,
                local_tensors(state_dict["tensors"]),
                decode(state_dict["metadata"]),
                strict=strict,
                check_hyperparameters=check_hyperparameters,
            )


def _routes_and_step(optimizer, parameters):
    routes = optimizer.assign_routes(parameters)
    names = {id(o): n for n, _, o in optimizer.named_stateful()}
    return {"routes": {n: names.get(id(o)) for n, o in routes.items()}, "step": int(numpy_scalar(optimizer.step))}
