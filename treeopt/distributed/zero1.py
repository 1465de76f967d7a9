"""ZeRO-1 for any treeopt optimizer on torch: each rank keeps the state of what it owns.

Every rank has the full averaged gradient (DDP). The :mod:`~treeopt.distributed.ownership`
plan gives each rank whole Muon matrices and whole or row-split elementwise parameters; the
rank runs the normal treeopt engine (fast paths included) on those, then every rank gets the
new values through one ``all_gather`` per dtype and bucket (each rank's owned values packed
into one flat buffer). Newton-Schulz therefore runs once per matrix per step, on its owner.

Whole-model options stay whole-model: the gradient norm of ``max_grad_norm`` is taken over
every gradient (each rank has them all) and the skip of ``skip_nonfinite`` is taken on every
rank when any rank sees a non-finite gradient. Every group steps on every rank, owned
parameters or not, so steps and schedules count alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from treeopt import checkpoint
from treeopt.clip import global_norm
from treeopt.distributed import ownership as _ownership
from treeopt.distributed.comm import Collectives
from treeopt.distributed.fsdp import check_current
from treeopt.distributed.routes import targets as route_targets
from treeopt.distributed.state import agreed, decode, encode, global_metadata, local_metadata, local_tensors, split_key
from treeopt.types import Options

if TYPE_CHECKING:
    from treeopt.checkpoint.format import LoadReport
    from treeopt.optimizer import Optimizer
    from treeopt.plan import Plan

__all__ = ["Zero1", "plan"]

BUCKET_BYTES = 64 << 20  # per rank and collective: bounds the receive buffer to W x this


def entry(name: str, param: torch.Tensor, optimizer: Optimizer, options: Options = ()) -> _ownership.Entry:
    """The :class:`~treeopt.distributed.ownership.Entry` of a parameter routed to ``optimizer``
    (with ``options`` for its rule)."""
    shape = tuple(param.shape)
    itemsize = param.element_size()
    expected = optimizer.store.expected(shape, str(param.dtype).removeprefix("torch."), options=options)
    state_bytes = sum(math.prod(s.shape) * getattr(torch, s.dtype).itemsize for s in expected.values())
    rule = optimizer.rule
    ns_steps = optimizer.scalars.hyperparameters().get("ns_steps")
    if rule is not None and rule.elementwise:
        kind, flops = _ownership.ELEMENTWISE, 0
    elif rule is not None and ns_steps is not None:  # an orthogonalising rule (Muon): balanced by its FLOPs
        kind, flops = _ownership.ORTH, _ownership.newton_schulz_flops(shape, ns_steps)
    else:  # Adafactor's row and column sums, custom apply_single: whole, balanced by bytes
        kind, flops = _ownership.WHOLE, 0
    return _ownership.Entry(name, shape, kind, state_bytes, param.numel() * itemsize, flops)


class _Segment:
    """A run of elements of one parameter that one rank updates: ``view`` is that part of
    the parameter (whole, or some rows)."""

    __slots__ = ("name", "view", "numel")

    def __init__(self, name: str, view: torch.Tensor) -> None:
        self.name, self.view, self.numel = name, view, view.numel()


def _copy_range(segments, start, stop, buffer, pack):
    """Copy elements ``[start, stop)`` of the concatenation of ``segments`` to ``buffer``
    (``pack``) or from it."""
    offset = 0
    for segment in segments:
        lo, hi = max(start, offset), min(stop, offset + segment.numel)
        if lo < hi:
            flat = segment.view.reshape(-1)
            part = buffer[lo - start : hi - start]
            if pack:
                part.copy_(flat[lo - offset : hi - offset])
            else:
                flat[lo - offset : hi - offset].copy_(part)
        offset += segment.numel
        if offset >= stop:
            break


class Zero1:
    """The ZeRO-1 step of ``optimizer`` over ``parameters`` (name -> tensor, in model order).

    Args:
        optimizer: any treeopt optimizer (a ``MultiOptimizer`` of Muon and AdamW...).
        parameters: the trainable parameters by name; the same names on every rank.
        group: the torch.distributed process group (default: the world).
        split_fraction: see :func:`treeopt.distributed.ownership.assign`.
        bucket_bytes: the most each rank sends per collective.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        parameters: Mapping[str, torch.Tensor],
        group: dist.ProcessGroup | None = None,
        split_fraction: float | None = 0.125,
        bucket_bytes: int = BUCKET_BYTES,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.optimizer, self.model, self._checked = optimizer, model, False
        self.parameters = dict(parameters)
        self.comm = Collectives(group, next(iter(self.parameters.values())).device)
        self.bucket_bytes = bucket_bytes
        with torch.no_grad():
            decided = route_targets(optimizer, self.parameters)
        routes: dict[str, Any] = {name: None if target is None else target.group for name, target in decided.items()}
        self.routes = routes  # name -> optimizer (None: frozen)
        entries = [
            entry(n, p, target.group, target.options)
            for n, p in self.parameters.items()
            if (target := decided.get(n)) is not None
        ]
        self.ownership = _ownership.assign(entries, self.comm.world, split_fraction)
        self._check_agreement()
        rank = self.comm.rank
        # the parts of the parameters this rank updates, made once: the compiled step keeps
        # a plan of the step as long as it sees the same tensors
        self.local = {}
        for name in self.ownership.owned(rank):
            start, stop = self.ownership.rows(name, rank)
            param = self.parameters[name]
            self.local[name] = param if self.ownership.owner[name] == rank else param[start:stop]
            if self.local[name] is not param:  # its slots are stored as the whole tensor's rows (state_dtype)
                routes[name].store.hold_part((name,), tuple(param.shape), start * math.prod(param.shape[1:]))
        self._layout = self._build_layout()
        with torch.no_grad():  # every owned slot exists from the start: rank-symmetric checkpoints
            optimizer.init(self.local)

    # ------------------------------------------------------------------ agreement
    def _check_agreement(self):
        """Every rank must plan alike: same names, shapes, routes and owners."""
        mine = (self.ownership.fingerprint(), sorted(self._route_names().items()))
        seen = self.comm.all_gather_object(mine)
        for rank, theirs in enumerate(seen):
            if theirs != mine:
                diff = sorted(set(map(tuple, mine[1])) ^ set(map(tuple, theirs[1])))[:5]
                raise RuntimeError(
                    f"treeopt ZeRO-1: rank {rank} plans differently from rank {self.comm.rank} "
                    f"(parameters, shapes or routes differ{': ' + str(diff) if diff else ''}); "
                    "every rank must build the same model and the same optimizer"
                )

    def _route_names(self):
        names = {id(member.group): member.name for member in self.optimizer.groups()}
        return {n: names.get(id(o)) for n, o in self.routes.items()}

    # ------------------------------------------------------------------ the step
    def _build_layout(self):
        """Per dtype: each rank's segments in plan order, and the flat size of the largest."""
        layout: dict[torch.dtype, list[list[_Segment]]] = {}
        for rank in range(self.comm.world):
            for name in self.ownership.owned(rank):
                start, stop = self.ownership.rows(name, rank)
                param = self.parameters[name]
                view = param if self.ownership.owner[name] == rank else param[start:stop]
                per_rank = layout.setdefault(param.dtype, [[] for _ in range(self.comm.world)])
                per_rank[rank].append(_Segment(name, view))
        return {
            dtype: (per_rank, max(sum(s.numel for s in segs) for segs in per_rank))
            for dtype, per_rank in layout.items()
        }

    def step(self, gradients: Mapping[str, torch.Tensor | None]) -> None:
        """One step: ``gradients`` maps every parameter name to its full averaged gradient
        (or ``None``)."""
        if not self._checked:
            check_current(self.model, self.parameters)
            self._checked = True
        local_grads: dict[str, torch.Tensor | None] = {}
        for name, view in self.local.items():
            grad = gradients.get(name)
            if grad is None:
                local_grads[name] = None
                continue
            if view is not self.parameters[name]:
                start, stop = self.ownership.rows(name, self.comm.rank)
                grad = grad[start:stop]
            local_grads[name] = grad
        options = getattr(self.optimizer, "whole_model", None)
        shared = None
        if options is not None and (options.max_grad_norm is not None or options.skip_nonfinite):
            shared = self._whole_model_norm([g for g in gradients.values() if g is not None])
        if shared is not None:
            self.optimizer.whole_model.shared_norm = lambda: shared  # type: ignore[attr-defined]  # read by whole_model
        try:
            skipped_before = self._skipped()
            self.optimizer.update(self.local, local_grads)
        finally:
            if shared is not None:
                self.optimizer.whole_model.shared_norm = None  # type: ignore[attr-defined]
        if self._skipped() == skipped_before:  # a skipped step changed nothing anywhere
            self.sync()

    def _skipped(self):
        return self.optimizer.state.get("skipped_steps", 0) if isinstance(self.optimizer.state, dict) else 0

    def _whole_model_norm(self, grads):
        """The norm of every gradient, the same on every rank; NaN on every rank when any
        rank sees a non-finite one (its copy of a gradient may differ)."""

        norm = global_norm(grads) if grads else torch.zeros(())
        if self.comm.any(not bool(torch.isfinite(norm))):
            norm = torch.full_like(norm, float("nan"))
        return norm

    @torch.no_grad()
    def sync(self) -> None:
        """Every rank gets the values each owner just computed: per dtype, one all-gather
        per bucket of at most ``bucket_bytes`` from each rank."""
        world, rank = self.comm.world, self.comm.rank
        if world == 1:
            return
        for dtype, (per_rank, largest) in self._layout.items():
            itemsize = torch.empty((), dtype=dtype).element_size()
            chunk = max(1, min(largest, self.bucket_bytes // itemsize))
            device = next(iter(self.parameters.values())).device
            send = torch.empty(chunk, dtype=dtype, device=device)
            received = torch.empty(world * chunk, dtype=dtype, device=device)
            for start in range(0, largest, chunk):
                stop = start + chunk
                _copy_range(per_rank[rank], start, stop, send, pack=True)
                self.comm.all_gather(received, send)
                for other in range(world):
                    if other != rank:
                        _copy_range(
                            per_rank[other], start, stop, received[other * chunk : (other + 1) * chunk], pack=False
                        )

    # ------------------------------------------------------------------ numbers for plans and benchmarks
    def totals(self) -> list[dict[str, int]]:
        """Per rank: state bytes, Newton-Schulz FLOPs per step, parameter bytes it sends."""
        o = self.ownership
        return [
            {"rank": r, "state_bytes": o.state_bytes[r], "ns_flops": o.flops[r], "param_bytes": o.param_bytes[r]}
            for r in range(o.world)
        ]

    def plan(self) -> Plan:
        """The routing plan with an owner column and per-rank totals (see :func:`plan`)."""
        return plan(self)

    # ------------------------------------------------------------------ state
    def init(self) -> None:
        with torch.no_grad():
            self.optimizer.init(self.local)

    def _mesh(self):
        if getattr(self, "_device_mesh", None) is None:
            # loads only when a checkpoint is resharded
            from torch.distributed.device_mesh import DeviceMesh

            device = next(iter(self.parameters.values())).device.type
            self._device_mesh = DeviceMesh.from_group(self.comm.group or _world(), device)
        return self._device_mesh

    def state_dict(self) -> dict[str, Any]:
        """Name-keyed state for ``torch.distributed.checkpoint``: owned slots as plain
        tensors, row-split ones as ``Shard(0)`` DTensors, the same metadata on every rank."""

        tensors, metadata = checkpoint.to_flat(self.optimizer, known=list(self.parameters))
        for key, value in list(tensors.items()):
            parsed = split_key(key)
            if parsed is not None and parsed[0] in self.ownership.entries and self.ownership.split(parsed[0]):
                tensors[key] = self._as_dtensor(parsed[0], value)
        split = {n: e.shape[0] for n, e in self.ownership.entries.items() if self.ownership.split(n)}
        return {"tensors": tensors, "metadata": encode(global_metadata(self.comm, metadata, split))}

    def _rows(self):
        """The parameters this rank updates: ``(start, stop)`` rows when split, else ``None``;
        frozen parameters are kept whole."""
        rank, o = self.comm.rank, self.ownership
        rows = {n: (o.rows(n, rank) if o.split(n) else None) for n in o.owned(rank)}
        rows.update({n: None for n in self.parameters if n not in o.entries})
        return rows

    def _as_dtensor(self, name, local):
        # loads only when a checkpoint is resharded
        from torch.distributed.tensor import DTensor, Shard

        rows = self.ownership.entries[name].shape[0]
        shape = (rows, *local.shape[1:])
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        return DTensor.from_local(
            local, self._mesh(), [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride
        )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, check_hyperparameters: bool = True
    ) -> LoadReport:
        """Load a state saved by :meth:`state_dict` at any world size (DCP reshards the
        tensors into this rank's layout first); returns this rank's load report."""

        metadata = agreed(self.comm, "checkpoint metadata being loaded", decode(state_dict["metadata"]))
        with torch.no_grad():
            self.init()
            report = checkpoint.from_flat(
                self.optimizer,
                local_tensors(state_dict["tensors"]),
                local_metadata(metadata, self._rows()),
                strict=strict,
                check_hyperparameters=check_hyperparameters,
            )
        return report


def _world():
    return dist.group.WORLD


def plan(zero1: Zero1) -> Plan:
    """The optimizer's :class:`~treeopt.plan.Plan` with an owner per parameter (global state
    bytes), and one line per rank: parameters, state bytes, Newton-Schulz GFLOP per step and
    the parameter bytes it sends per step."""

    o = zero1.ownership
    result = zero1.optimizer.plan()
    result.rows = [
        replace(row, owner=str(o.owner[row.path]), state_bytes=o.entries[row.path].state_bytes)
        if row.path in o.entries
        else row
        for row in result.rows
    ]
    result.groups = [
        replace(g, state_bytes=sum(r.state_bytes for r in result.rows if r.group == g.index)) for g in result.groups
    ]
    result.ranks = [
        {
            "rank": r,
            "parameters": len(o.owned(r)),
            "state_bytes": o.state_bytes[r],
            "ns_gflop": o.flops[r] / 1e9,
            "sent_bytes": o.param_bytes[r],
        }
        for r in range(o.world)
    ]
    return result
