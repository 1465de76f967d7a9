"""The few torch.distributed collectives treeopt uses, counted.

Every call goes through :class:`Collectives`, which records how many collectives ran and how
many bytes this rank sent, under the cost of a ring (the algorithm NCCL and gloo use for
large messages): an all-gather of ``W`` chunks of ``c`` bytes sends ``(W-1)*c`` per rank, an
all-reduce of ``n`` bytes ``2*(W-1)/W*n``; an all-to-all sends what goes to the other ranks.
The benchmark reads the counts; tests read them to check bucketing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Collectives:
    """The process group's collectives, counted per rank."""

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> None:
        self.group, self.device = group, device  # NCCL needs the flags on the GPU
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.calls = 0
        self.sent_bytes = 0

    def _count(self, nbytes):
        self.calls += 1
        self.sent_bytes += int(nbytes)

    def all_gather(self, output: torch.Tensor, chunk: torch.Tensor) -> None:
        """``output`` (``W * chunk.numel()`` elements) gets every rank's ``chunk`` in rank order."""
        self._count((self.world - 1) * chunk.numel() * chunk.element_size())
        if self.world == 1:
            output.copy_(chunk)
        else:
            _all_gather_single(output, chunk, group=self.group)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        self._count(2 * (self.world - 1) * tensor.numel() * tensor.element_size() // self.world)
        if self.world > 1:
            dist.all_reduce(tensor, op=op, group=self.group)

    def all_to_all(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
    ) -> None:
        """``all_to_all_single``; counted exactly: what this rank sends to the others."""
        sizes = input_split_sizes or [input.numel() // self.world] * self.world
        self._count((sum(sizes) - sizes[self.rank]) * input.element_size())
        if self.world == 1:
            output.copy_(input)
        else:
            dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=self.group)

    def all_gather_object(self, value: object) -> list[Any]:
        """Every rank's ``value`` (small Python objects: plans, fingerprints, metadata)."""
        gathered: list[Any] = [None] * self.world
        self.calls += 1
        if self.world == 1:
            gathered[0] = value
        else:
            dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())
