"""FSDP2 / DTensor parameters (``fully_shard``): each rank updates its rows; Muon gathers.

Every parameter is a ``DTensor`` sharded ``Shard(0)`` on a 1-D mesh, and so is its gradient.

- Elementwise rules (AdamW, Lion...) run through the normal engine on the local shards: a
  rule on some rows is the rule on those elements. Their slots are local tensors of the
  shard's shape; :meth:`FullyShardedStep.state_dict` hands them out as DTensors with the
  parameter's placement, which ``torch.distributed.checkpoint`` reshards.
- Muon runs its elementwise part (decay, momentum) on the local rows, keeping the momentum
  sharded like the parameter. Each matrix then goes whole to one owner (balanced by
  Newton-Schulz cost, see :mod:`~treeopt.distributed.ownership`) through one
  ``all_to_all_single`` per optimizer and dtype (uneven and empty shards are uneven splits,
  no padding), the owner orthogonalises it once, a second ``all_to_all_single`` returns the
  rows, and every rank applies its rows.

Refused, with the parameter's path: placements other than ``Shard(0)`` on a 1-D mesh, rules
that need a whole matrix other than Muon (Adafactor), and gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from treeopt import engine
from treeopt.distributed import ownership as _ownership
from treeopt.distributed.comm import Collectives
from treeopt.errors import ParameterError

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from treeopt.checkpoint.format import LoadReport
    from treeopt.optimizer import Optimizer

__all__ = ["FullyShardedStep", "is_sharded"]


def is_sharded(param: object) -> TypeGuard[DTensor]:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def _check_placement(name, param):
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise ParameterError(
            f"treeopt: parameter {name!r} is a DTensor with placements {placements} on a {param.device_mesh.ndim}-D "
            "mesh; treeopt supports Shard(0) on a 1-D mesh (fully_shard's default; for HSDP pass the shard "
            "sub-mesh)",
            name,
        )


class FullyShardedStep:
    """The step of ``optimizer`` over FSDP2 (``Shard(0)`` DTensor) parameters."""

    def __init__(
        self, optimizer: Optimizer, parameters: Mapping[str, torch.Tensor], model: torch.nn.Module | None = None
    ) -> None:
        self.optimizer = optimizer
        self.parameters = dict(parameters)
        self.model = model
        sharded = {n: p for n, p in self.parameters.items() if is_sharded(p)}
        for name, shard in sharded.items():
            _check_placement(name, shard)
        meshes = {id(p.device_mesh) for p in sharded.values()}
        first = next(iter(sharded.values()))
        self.mesh = first.device_mesh
        if len(meshes) > 1 and len({p.device_mesh.get_group() for p in sharded.values()}) > 1:
            raise ParameterError(
                "treeopt: the parameters are sharded over different meshes; one mesh is supported", next(iter(sharded))
            )
        self.comm = Collectives(self.mesh.get_group(), first.to_local().device)
        options = getattr(optimizer, "whole_model", None)
        if options is not None and options.accumulating:
            raise NotImplementedError(
                "treeopt: accumulate=... with FSDP2 parameters is not supported; "
                "accumulate in the training loop (no_sync / several backward passes)"
            )
        with torch.no_grad():
            self.routes = optimizer.assign_routes(self.parameters)
        self.local = {}
        self.moment_shapes: dict[str, tuple[int, ...] | None] = {}  # NorMuon's, whole, by matrix
        entries = []
        for name, param in self.parameters.items():
            owner = self.routes.get(name)
            if owner is None:
                continue
            rule = owner.rule
            muon = rule is not None and rule.name == "muon"
            if is_sharded(param) and not muon and (rule is None or not rule.elementwise):
                raise ParameterError(
                    f"treeopt: {type(owner).__name__} needs whole matrices but {name!r} is sharded (FSDP2); route it "
                    "to an elementwise optimizer (AdamW...) or Muon",
                    name,
                )
            local = param.to_local() if is_sharded(param) else param
            if is_sharded(param):
                start, stop = _ownership.row_range(param.shape[0], self.comm.world, self.comm.rank)
                if local.shape[0] != stop - start:
                    raise ParameterError(
                        f"treeopt: {name!r} holds {local.shape[0]} rows on rank {self.comm.rank}, "
                        f"expected {stop - start} (torch.chunk's split)",
                        name,
                    )
            self.local[name] = local
            if muon and param.ndim >= 2:
                self._check_moment(name, param, local, owner)
                shape = tuple(param.shape)
                entries.append(
                    _ownership.Entry(
                        name,
                        shape,
                        _ownership.ORTH,
                        0,
                        0,
                        _ownership.newton_schulz_flops(shape, owner.ns_steps),  # type: ignore[attr-defined]  # a Muon
                    )
                )
        self.matrices = [e.name for e in entries]  # Muon matrices, gathered to owners
        self.ownership = _ownership.assign(entries, self.comm.world)
        self._checked = False
        with torch.no_grad():
            optimizer.init(self.local)

    def init(self) -> None:
        with torch.no_grad():
            self.optimizer.init(self.local)

    def _check_moment(self, name, param, local, owner):
        """A Muon slot other than the momentum (NorMuon's one value per neuron) must be split
        by rows as its parameter is, so that each rank's rows of it go with its rows of the
        matrix to the owner."""
        whole = owner.slot_shapes(param).get("second_moment")
        self.moment_shapes[name] = whole
        if whole is None:
            return
        mine = owner.slot_shapes(local).get("second_moment")
        if whole[0] != param.shape[0] or mine != (local.shape[0],) + tuple(whole[1:]):
            raise ParameterError(
                f"treeopt: NorMuon's per-neuron second moment of {name!r} ({tuple(whole)} for a {tuple(param.shape)} "
                "weight) is not split by rows as the weight is under FSDP2 (normuon='larger' or layout='in_out'); "
                "use normuon='output' with (out, in) weights",
                name,
            )

    # ------------------------------------------------------------------ the step
    def step(self, gradients: Mapping[str, torch.Tensor | None]) -> None:
        if not self._checked:
            self._checked = True
            check_current(self.model, self.parameters)
        grads = {
            n: (g.to_local() if g is not None and is_sharded(g) else g) for n, g in gradients.items() if n in self.local
        }
        if all(g is None for g in grads.values()):
            raise RuntimeError(
                "treeopt: no parameter has a gradient. Was the optimizer built before fully_shard? "
                "Build treeopt.torch.Optimizer after fully_shard(model)"
            )
        options = getattr(self.optimizer, "whole_model", None)
        shared = None
        if options is not None and (options.max_grad_norm is not None or options.skip_nonfinite):
            shared = self._norm(grads)
            self.optimizer.shared_norm = lambda: shared  # type: ignore[attr-defined]  # read by whole_model
        matrices = {n: grads[n] for n in self.matrices if grads.get(n) is not None}
        elementwise = {n: g for n, g in grads.items() if n not in matrices}
        skipped = self.optimizer.state.get("skipped_steps", 0)
        try:
            self.optimizer.update({n: self.local[n] for n in elementwise}, elementwise)
        finally:
            self.optimizer.shared_norm = None  # type: ignore[attr-defined]
        if self.optimizer.state.get("skipped_steps", 0) != skipped:
            return
        if shared is not None and options is not None and options.max_grad_norm is not None:
            from treeopt.clip import clip_factor, scale

            factor = clip_factor(shared, options.max_grad_norm)
            matrices = {n: scale(g, factor) for n, g in matrices.items()}
        self._muon(matrices)

    def _norm(self, grads):
        """The global norm: local sums of squares, all-reduced (float32 for half types)."""
        total = torch.zeros((), dtype=torch.float32, device=self.comm.device)
        for name, g in grads.items():
            if g is not None and (is_sharded(self.parameters[name]) or self.comm.rank == 0):  # replicated: once
                total = total + (g.float() * g.float()).sum()
        self.comm.all_reduce(total)
        return total.sqrt()

    def _muon(self, grads):
        from treeopt.rules.muon import matrix_lr, muon_apply, muon_direction, muon_orthogonalize

        by_optimizer: dict[int, list[str]] = {}
        for name in self.matrices:
            if name in grads:
                by_optimizer.setdefault(id(self.routes[name]), []).append(name)
        for names in by_optimizer.values():
            optimizer = self.routes[names[0]]
            assert optimizer is not None  # a routed matrix
            by_dtype: dict[torch.dtype, list[str]] = {}
            for name in names:
                by_dtype.setdefault(self.local[name].dtype, []).append(name)
            for group in by_dtype.values():
                first = self.local[group[0]]
                coefficients = optimizer.coefficients(first, _backend(first))
                directions, moments = {}, {}
                for name in group:
                    slots = engine.slots_at(optimizer, (name,))
                    assert slots is not None  # created at construction
                    direction, v = muon_direction(grads[name], self.local[name], slots["v"], **coefficients)
                    slots["v"].copy_(v)
                    directions[name], moments[name] = direction, slots.get("second_moment")
                updates, moments = self._orthogonalize_on_owners(
                    group, directions, moments, coefficients, muon_orthogonalize
                )
                for name in group:  # the rate depends on the global shape: every rank computes it alike
                    if moments[name] is not None:
                        slots = engine.slots_at(optimizer, (name,))
                        assert slots is not None
                        slots["second_moment"].copy_(moments[name])
                    c = coefficients
                    shape = tuple(self.parameters[name].shape)
                    rate = matrix_lr(
                        c["lr"], shape, c["layout"], c["adjust_lr"], c["batch_axes"], c["num_heads"], c["split_sizes"]
                    )
                    update = muon_apply(
                        self.local[name], updates[name], rate, coefficients["keep"], coefficients["cautious"]
                    )
                    self.local[name].copy_(update)

    def _orthogonalize_on_owners(self, names, directions, moments, coefficients, orthogonalize):
        """Each matrix's rows (with their second moments, NorMuon's) to its owner, Newton-Schulz
        there once, the rows back: ``(updates, second moments)``, each rank's rows."""
        world, rank = self.comm.world, self.comm.rank
        first = directions[names[0]]
        owner = self.ownership.owner
        rows = {n: [_ownership.row_range(self.parameters[n].shape[0], world, r) for r in range(world)] for n in names}
        width = {n: int(torch.Size(self.parameters[n].shape[1:]).numel()) for n in names}
        # the second moment's shape behind its rows, or None (no NorMuon)
        tails = {n: None if (whole := self.moment_shapes.get(n)) is None else tuple(whole[1:]) for n in names}
        extra = {n: 0 if (tail := tails[n]) is None else int(torch.Size(tail).numel()) for n in names}

        def size(name, r):
            start, stop = rows[name][r]
            return (stop - start) * (width[name] + extra[name])

        def pack(name, update, moment):  # row by row: the matrix's elements, then its moments'
            if moment is None:
                return update.reshape(-1)
            count = update.shape[0]
            return torch.cat([update.reshape(count, width[name]), moment.reshape(count, extra[name])], dim=1).reshape(
                -1
            )

        def unpack(name, flat, shape):
            tail = tails[name]
            if tail is None:
                return flat.reshape(shape), None
            table = flat.reshape(shape[0], width[name] + extra[name])
            moment_shape = (shape[0],) + tail
            return table[:, : width[name]].reshape(shape), table[:, width[name] :].reshape(moment_shape)

        # forward: my rows of each matrix, grouped by destination (its owner)
        send = [pack(n, directions[n], moments[n]) for d in range(world) for n in names if owner[n] == d]
        send_sizes = [sum(size(n, rank) for n in names if owner[n] == d) for d in range(world)]
        receive_sizes = [sum(size(n, r) for n in names if owner[n] == rank) for r in range(world)]
        gathered = torch.empty(sum(receive_sizes), dtype=first.dtype, device=first.device)
        self.comm.all_to_all(gathered, _cat(send, first), receive_sizes, send_sizes)
        # assemble my matrices: from each source rank, its rows of my matrices in plan order
        mine = [n for n in names if owner[n] == rank]
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in mine}
        offset = 0
        for r in range(world):
            for n in mine:
                parts[n].append(gathered[offset : offset + size(n, r)])
                offset += size(n, r)
        results = {}
        for n in mine:
            full, moment = unpack(n, torch.cat(parts[n]), tuple(self.parameters[n].shape))
            update, _, moment = orthogonalize(full, second_moment=moment, **coefficients)
            results[n] = pack(n, update, moment).reshape(full.shape[0], width[n] + extra[n])
        # back: to each rank its rows of my matrices
        back = [results[n][rows[n][d][0] : rows[n][d][1]].reshape(-1) for d in range(world) for n in mine]
        back_sizes = [sum(size(n, d) for n in mine) for d in range(world)]
        returned = torch.empty(sum(send_sizes), dtype=first.dtype, device=first.device)
        self.comm.all_to_all(returned, _cat(back, first), send_sizes, back_sizes)
        updates, new_moments, offset = {}, {}, 0
        for d in range(world):
            for n in names:
                if owner[n] == d:
                    piece = returned[offset : offset + size(n, rank)]
                    updates[n], new_moments[n] = unpack(n, piece, tuple(self.local[n].shape))
                    offset += size(n, rank)
        return updates, new_moments

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        from treeopt import checkpoint
        from treeopt.distributed.state import encode, global_metadata, split_key

        tensors, metadata = checkpoint.to_flat(self.optimizer, known=list(self.parameters))
        for key, value in list(tensors.items()):
            parsed = split_key(key)
            if parsed is not None and is_sharded(self.parameters.get(parsed[0])):
                tensors[key] = self._as_dtensor(parsed[0], value)
        rows = {n: p.shape[0] for n, p in self.parameters.items() if is_sharded(p)}
        return {"tensors": tensors, "metadata": encode(global_metadata(self.comm, metadata, rows))}

    def _as_dtensor(self, name, local):
        from torch.distributed.tensor import DTensor

        param = self.parameters[name]
        assert isinstance(param, DTensor)  # a sharded parameter's slot
        return DTensor.from_local(
            local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, check_hyperparameters: bool = True
    ) -> LoadReport:
        from treeopt import checkpoint
        from treeopt.distributed.state import agreed, decode, local_metadata, local_tensors

        metadata = agreed(self.comm, "checkpoint metadata being loaded", decode(state_dict["metadata"]))
        rows = {
            n: (_ownership.row_range(p.shape[0], self.comm.world, self.comm.rank) if is_sharded(p) else None)
            for n, p in self.parameters.items()
        }
        with torch.no_grad():
            self.init()
            return checkpoint.from_flat(
                self.optimizer,
                local_tensors(state_dict["tensors"]),
                local_metadata(metadata, rows),
                strict=strict,
                check_hyperparameters=check_hyperparameters,
            )


def _cat(pieces, like):
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=like.dtype, device=like.device)


def _backend(tensor):
    from treeopt.backends import backend_of

    return backend_of(tensor)


def check_current(model: torch.nn.Module | None, parameters: Mapping[str, torch.Tensor]) -> None:
    """Raise when the model no longer holds the parameters the optimizer was built with
    (built before ``fully_shard`` replaced them): its steps would change nothing."""
    if model is None:
        return
    current = {id(p) for p in model.parameters()}
    stale = [n for n, p in parameters.items() if id(p) not in current]
    if stale:
        raise RuntimeError(
            f"treeopt: the model no longer holds the parameters the optimizer was built with ({stale[0]!r}...): "
            "was it built before fully_shard? Build treeopt.torch.Optimizer after fully_shard(model)"
        )
