"""treeopt on several processes with torch.distributed: DDP, ZeRO-1 and FSDP2 parameters.

- :mod:`~treeopt.distributed.ownership`: who owns what under ZeRO-1 (pure, no torch).
- :mod:`~treeopt.distributed.zero1`: the ZeRO-1 step (owners update, one all-gather per
  bucket sends the new values).
- :mod:`~treeopt.distributed.state`: state dicts keyed by name with the same metadata on
  every rank, which ``torch.distributed.checkpoint`` saves and reshards.

Users reach it through ``treeopt.torch.Optimizer(model, optimizer, sharding="zero1")``;
see docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

    from treeopt.distributed.fsdp import FullyShardedStep
    from treeopt.distributed.replicated import Replicated
    from treeopt.distributed.zero1 import Zero1
    from treeopt.optimizer import Optimizer


__all__ = ["attach", "SHARDINGS"]

SHARDINGS = (None, "replicated", "zero1")


def attach(
    optimizer: Optimizer,
    parameters: Mapping[str, torch.Tensor],
    sharding: str | None = None,
    process_group: dist.ProcessGroup | None = None,
    model: torch.nn.Module | None = None,
) -> Replicated | Zero1 | FullyShardedStep | None:
    """The distributed step of ``optimizer`` over the trainable ``parameters`` of a
    ``treeopt.torch.Optimizer``: ``None`` in one process, a
    :class:`~treeopt.distributed.replicated.Replicated` check under DDP, a
    :class:`~treeopt.distributed.zero1.Zero1` with ``sharding="zero1"``, a
    :class:`~treeopt.distributed.fsdp.FullyShardedStep` for FSDP2 (DTensor) parameters."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    # torch here, not at the top: checkpoints import this package (folders) without torch
    import torch.distributed as dist

    from treeopt.distributed.fsdp import FullyShardedStep, is_sharded
    from treeopt.distributed.replicated import Replicated
    from treeopt.distributed.zero1 import Zero1

    running = dist.is_available() and dist.is_initialized()
    if running and any(is_sharded(p) for p in parameters.values()):
        if sharding == "zero1":
            raise ValueError(
                "the parameters are already sharded (FSDP2 DTensors): leave sharding=None; "
                "their state is sharded like them"
            )
        return FullyShardedStep(optimizer, parameters, model=model)
    if sharding == "zero1":
        if not running:
            raise RuntimeError(
                "sharding='zero1' needs torch.distributed: call "
                "torch.distributed.init_process_group first (torchrun sets it up)"
            )
        return Zero1(optimizer, parameters, group=process_group, model=model)
    if running and (sharding == "replicated" or dist.get_world_size(process_group) > 1):
        return Replicated(optimizer, parameters, group=process_group, model=model)
    if sharding == "replicated" or process_group is not None:
        raise RuntimeError("sharding='replicated' and process_group need torch.distributed to be initialised")
    return None
