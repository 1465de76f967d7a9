"""Who updates what under ZeRO-1: a deterministic, balanced split of the parameters over ranks.

Pure Python, computed identically on every rank from names, shapes and rules alone:

1. Matrices of an orthogonalising rule (Muon) stay whole, so Newton-Schulz runs once per
   matrix on its owner. They are placed largest-cost first on the rank with the least
   Newton-Schulz work so far (LPT), cost ``2 * ns_steps * s^2 * (2l + s)`` FLOPs for an
   ``l x s`` matrix (``s <= l``); ties by state bytes, then by name.
2. Elementwise parameters whose state is large (more than ``split_fraction`` of one rank's
   ideal share) are split by rows over every rank, as ``torch.chunk`` would (``ceil(n/W)``
   rows each, the last ranks possibly empty): that is ``DTensor``'s ``Shard(0)`` layout, so
   checkpoints reshard. An elementwise rule on a row range is the rule on those elements.
3. Every other parameter stays whole and goes, largest state first, to the rank with the
   fewest state bytes so far (ties by name, then lowest rank).
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Entry", "Ownership", "assign", "newton_schulz_flops", "row_range"]

#: kinds of parameters, by what their rule needs
ORTH, WHOLE, ELEMENTWISE = "orth", "whole", "elementwise"


def newton_schulz_flops(shape: Sequence[int], steps: int) -> int:
    """FLOPs of ``steps`` Newton-Schulz iterations on a matrix of ``shape`` (more dims flatten
    to ``(shape[0], -1)``): per iteration ``X X^T``, ``A A`` and ``B X``."""
    if len(shape) < 2:
        return 0
    rows, cols = shape[0], math.prod(shape[1:])
    small, large = min(rows, cols), max(rows, cols)
    return 2 * steps * small * small * (2 * large + small)


def row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of ``rank``'s rows when ``rows`` are split as ``torch.chunk`` and
    ``Shard(0)`` split them: ``ceil(rows / world)`` each, the last ranks short or empty."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


@dataclass(frozen=True)
class Entry:
    """One trainable parameter as the plan sees it."""

    name: str
    shape: tuple[int, ...]
    kind: str  # ORTH, WHOLE or ELEMENTWISE
    state_bytes: int  # of its optimizer slots, whole
    param_bytes: int
    flops: int = 0  # Newton-Schulz FLOPs per step (ORTH only)


@dataclass
class Ownership:
    """The result: each parameter's owner (a rank) or ``"rows"`` (split over every rank)."""

    world: int
    owner: dict[str, int | str]  # name -> rank, or "rows"
    entries: dict[str, Entry]  # name -> Entry
    state_bytes: list[int] = field(default_factory=list)  # per rank
    param_bytes: list[int] = field(default_factory=list)  # per rank: what it sends each step
    flops: list[int] = field(default_factory=list)  # Newton-Schulz FLOPs per rank per step

    def split(self, name: str) -> bool:
        return self.owner[name] == "rows"

    def rows(self, name: str, rank: int) -> tuple[int, int]:
        """``(start, stop)`` rows of ``name`` that ``rank`` updates (all rows when it owns the
        whole parameter, ``(0, 0)`` when none)."""
        entry = self.entries[name]
        rows = entry.shape[0] if entry.shape else 1
        if self.split(name):
            return row_range(rows, self.world, rank)
        return (0, rows) if self.owner[name] == rank else (0, 0)

    def owned(self, rank: int) -> list[str]:
        """Names ``rank`` updates (whole or some rows), in plan order."""
        return [
            n
            for n in self.entries
            if self.owner[n] == rank or (self.split(n) and self.rows(n, rank)[1] > self.rows(n, rank)[0])
        ]

    def imbalance(self) -> tuple[float, float]:
        """``(state max/mean, Newton-Schulz FLOPs max/mean)``; 1.0 is perfect."""

        def ratio(values):
            mean = sum(values) / len(values)
            return max(values) / mean if mean else 1.0

        return ratio(self.state_bytes), ratio(self.flops)

    def fingerprint(self) -> str:
        """A short string equal on two ranks exactly when their plans are equal."""

        text = repr(
            sorted((n, str(o), tuple(self.entries[n].shape), self.entries[n].kind) for n, o in self.owner.items())
        )
        return hashlib.sha256(f"{self.world}:{text}".encode()).hexdigest()[:16]


def assign(entries: Sequence[Entry], world: int, split_fraction: float | None = 0.125) -> Ownership:
    """The :class:`Ownership` of ``entries`` (a list of :class:`Entry`, in model order) over
    ``world`` ranks. ``split_fraction``: elementwise parameters whose state exceeds this
    fraction of ``total state / world`` are split by rows (``None``: never split)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("two parameters have the same name")
    by_name = {e.name: e for e in entries}
    owner: dict[str, int | str] = {}  # name -> rank, or "rows"
    state, sent, flops = [0] * world, [0] * world, [0] * world

    # 1. whole matrices by Newton-Schulz cost
    heap: list[tuple[int, ...]] = [(0, 0, rank) for rank in range(world)]
    for e in sorted((e for e in entries if e.kind == ORTH), key=lambda e: (-e.flops, -e.state_bytes, e.name)):
        load, size, rank = heapq.heappop(heap)
        owner[e.name] = rank
        flops[rank] += e.flops
        state[rank] += e.state_bytes
        sent[rank] += e.param_bytes
        heapq.heappush(heap, (load + e.flops, size + e.state_bytes, rank))

    # 2. large elementwise parameters by rows over every rank
    ideal = sum(e.state_bytes for e in entries) / world
    rest = []
    for e in entries:
        if e.kind == ORTH:
            continue
        rows = e.shape[0] if e.shape else 0
        large = split_fraction is not None and e.state_bytes > split_fraction * ideal
        if e.kind == ELEMENTWISE and world > 1 and large and rows >= world:
            owner[e.name] = "rows"
            for rank in range(world):
                start, stop = row_range(rows, world, rank)
                state[rank] += e.state_bytes * (stop - start) // rows
                sent[rank] += e.param_bytes * (stop - start) // rows
        else:
            rest.append(e)

    # 3. the rest whole, by state bytes
    heap = [(state[rank], rank) for rank in range(world)]
    heapq.heapify(heap)
    for e in sorted(rest, key=lambda e: (-e.state_bytes, -e.param_bytes, e.name)):
        load, rank = heapq.heappop(heap)
        owner[e.name] = rank
        state[rank] += e.state_bytes
        sent[rank] += e.param_bytes
        heapq.heappush(heap, (load + e.state_bytes, rank))

    return Ownership(world, {n: owner[n] for n in names}, by_name, state, sent, flops)
