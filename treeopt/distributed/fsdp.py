"""FSDP2 / DTensor parameters (``fully_shard``): each rank updates its rows; a rule that
needs whole tensors runs on one owner per tensor.

Every parameter is a ``DTensor`` sharded ``Shard(0)`` on a 1-D mesh, and so is its gradient.

- Elementwise rules (AdamW, Lion...) run through the normal engine on the local shards: a
  rule on some rows is the rule on those elements. Their slots are local tensors of the
  shard's shape; :meth:`FullyShardedStep.state_dict` hands them out as DTensors with the
  parameter's placement, which ``torch.distributed.checkpoint`` reshards.
- A rule that is not elementwise (Muon: Newton-Schulz on the whole matrix), and whose slots
  are shaped like the parameter (so they are sharded like it), needs each tensor whole on one
  owner (balanced by Newton-Schulz cost, see :mod:`~treeopt.distributed.ownership`). When the
  rule declares its ``parts`` (:class:`treeopt.rules.base.Parts`), every rank runs the
  elementwise part on its rows (Muon's decay and momentum, the momentum staying sharded), one
  ``all_to_all_single`` per group and dtype sends the rows of the direction to the owners
  (uneven and empty shards are uneven splits, no padding), the owner runs the whole-tensor
  part once, a second ``all_to_all_single`` returns the rows, and every rank applies its
  rows: each rank sends and receives ``2(W-1)/W^2`` of the matrices' bytes. A rule without
  ``parts`` sends the rows of the gradient, the parameter and the slots instead, and the
  owner runs the engine's rule runner on the whole tensor.

Refused, with the parameter's path: placements other than ``Shard(0)`` on a 1-D mesh, rules
that need a whole tensor and keep slots of other shapes (Adafactor) or a custom
``apply_single``, and gradient accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from treeopt import checkpoint, engine
from treeopt.backends import backend_of
from treeopt.clip import clip_factor, scale
from treeopt.distributed import ownership as _ownership
from treeopt.distributed.comm import Collectives
from treeopt.distributed.state import agreed, decode, encode, global_metadata, local_metadata, local_tensors, split_key
from treeopt.errors import ParameterError

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from treeopt.checkpoint.format import LoadReport
    from treeopt.optimizer import Optimizer

__all__ = ["FullyShardedStep", "is_sharded"]


def is_sharded(param: object) -> TypeGuard[DTensor]:
    # loads only with FSDP2 parameters
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def _check_placement(name, param):
    # loads only with FSDP2 parameters
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
            targets = {pair.path: target for pair, target in engine.route(optimizer.router, self.parameters, "FSDP2")}
        self.routes = {name: None if target is None else target.group for name, target in targets.items()}
        self.options = {name: target.options for name, target in targets.items() if target is not None}
        self.local = {}
        entries = []
        for name, param in self.parameters.items():
            group = self.routes.get(name)
            if group is None:
                continue
            rule = group.scalars.rule if group.runs_rule else None
            whole = rule is None or not rule.elementwise  # the rule needs each tensor whole
            # slots shaped like the parameter are sharded like it; other slots (Adafactor's
            # row and column sums) and custom steps cannot be
            if is_sharded(param) and whole and (rule is None or callable(rule.slots)):
                raise ParameterError(
                    f"treeopt: {type(group).__name__} needs whole matrices but {name!r} is sharded (FSDP2); route it "
                    "to an elementwise optimizer (AdamW...) or to one whose slots are shaped like the parameter "
                    "(Muon)",
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
            if is_sharded(param) and whole:
                shape = tuple(param.shape)
                ns_steps = group.scalars.hyperparameters().get("ns_steps")
                cost = math.prod(shape) if ns_steps is None else _ownership.newton_schulz_flops(shape, ns_steps)
                entries.append(_ownership.Entry(name, shape, _ownership.ORTH, 0, 0, cost))
        self.matrices = [e.name for e in entries]  # tensors of rules that need them whole, gathered to owners
        self.ownership = _ownership.assign(entries, self.comm.world)
        self._checked = False
        with torch.no_grad():
            optimizer.init(self.local)

    def init(self) -> None:
        with torch.no_grad():
            self.optimizer.init(self.local)

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
            self.optimizer.whole_model.shared_norm = lambda: shared  # type: ignore[attr-defined]  # read by whole_model
        matrices = {n: grads[n] for n in self.matrices if grads.get(n) is not None}
        elementwise = {n: g for n, g in grads.items() if n not in matrices}
        skipped = self.optimizer.state.get("skipped_steps", 0)
        try:
            self.optimizer.update({n: self.local[n] for n in elementwise}, elementwise)
        finally:
            self.optimizer.whole_model.shared_norm = None  # type: ignore[attr-defined]
        if self.optimizer.state.get("skipped_steps", 0) != skipped:
            return
        if shared is not None and options is not None and options.max_grad_norm is not None:
            factor = clip_factor(shared, options.max_grad_norm)
            matrices = {n: scale(g, factor) for n, g in matrices.items()}
        self._whole(matrices)

    def _norm(self, grads):
        """The global norm: local sums of squares, all-reduced (float32 for half types)."""
        total = torch.zeros((), dtype=torch.float32, device=self.comm.device)
        for name, g in grads.items():
            if g is not None and (is_sharded(self.parameters[name]) or self.comm.rank == 0):  # replicated: once
                total = total + (g.float() * g.float()).sum()
        self.comm.all_reduce(total)
        return total.sqrt()

    def _whole(self, grads):
        """The tensors whose rule needs them whole: per group and dtype, each tensor's rows
        (gradient, parameter, slots) to its owner, the engine's rule runner there once, the
        rows of the results back."""
        by_group: dict[int, list[str]] = {}
        for name in self.matrices:
            if name in grads:
                by_group.setdefault(id(self.routes[name]), []).append(name)
        for names in by_group.values():
            group = self.routes[names[0]]
            assert group is not None  # a routed tensor
            by_dtype: dict[torch.dtype, list[str]] = {}
            for name in names:
                by_dtype.setdefault(self.local[name].dtype, []).append(name)
            for same in by_dtype.values():
                self._run_on_owners(group, same, grads)

    def _run_on_owners(self, group, names, grads):
        parts = group.scalars.rule.parts
        slots = {n: group.store.slots((n,)) for n in names}  # created at construction, in one order everywhere
        if parts is None:  # the rows of everything the rule reads to the owner, the rule there
            mine = self._exchange(names, {n: [grads[n], self.local[n], *slots[n].values()] for n in names})
            results = {}
            for n, (grad, param, *state) in mine.items():  # the rule runs on each whole tensor once
                pair = engine.Pair((n,), grad, param, _backend(param))
                pair.slots, pair.options = dict(zip(slots[n], state)), self.options[n]
                engine.run_rule(group, [pair], in_place=False)
                results[n] = [pair.result, *pair.slots.values()]
            self._return(names, results, {n: [self.local[n], *slots[n].values()] for n in names})
            return
        # the elementwise parts on my rows; only the direction travels
        coefficients, directions = {}, {}
        for n in names:
            pair = engine.Pair((n,), grads[n], self.local[n], _backend(self.local[n]))
            pair.options = self.options[n]
            coefficients[n] = values = engine.coefficients(group, pair)
            direction, *state = parts.direction(grads[n], self.local[n], *slots[n].values(), **values)
            for target, value in zip(slots[n].values(), state):
                target.copy_(value)
            directions[n] = torch.empty_like(self.local[n])
            directions[n].copy_(direction)
        whole = {
            n: [parts.whole(direction, **coefficients[n])] for n, (direction,) in self._exchange(
                names, {n: [directions[n]] for n in names}
            ).items()
        }
        self._return(names, whole, {n: [directions[n]] for n in names})
        for n in names:
            shape = tuple(self.parameters[n].shape)
            self.local[n].copy_(parts.apply(self.local[n], directions[n], shape, **coefficients[n]))

    def _rows(self, names):
        world = self.comm.world
        rows = {n: [_ownership.row_range(self.parameters[n].shape[0], world, r) for r in range(world)] for n in names}
        width = {n: int(torch.Size(self.parameters[n].shape[1:]).numel()) for n in names}

        def size(name, r):
            start, stop = rows[name][r]
            return (stop - start) * width[name]

        return rows, size

    def _exchange(self, names, tensors):
        """Every rank's rows of ``tensors[n]`` (a list of local tensors per name) to the
        owner of ``n``: ``{n: [whole tensor, ...]}`` of the tensors this rank owns."""
        world, rank, owner = self.comm.world, self.comm.rank, self.ownership.owner
        _, size = self._rows(names)
        count = {n: len(tensors[n]) for n in names}
        like = self.local[names[0]]
        # my rows of each tensor, grouped by destination (its owner), in plan order
        send = [t.reshape(-1) for d in range(world) for n in names if owner[n] == d for t in tensors[n]]
        send_sizes = [sum(size(n, rank) * count[n] for n in names if owner[n] == d) for d in range(world)]
        receive_sizes = [sum(size(n, r) * count[n] for n in names if owner[n] == rank) for r in range(world)]
        gathered = torch.empty(sum(receive_sizes), dtype=like.dtype, device=like.device)
        self.comm.all_to_all(gathered, _cat(send, like), receive_sizes, send_sizes)
        mine = [n for n in names if owner[n] == rank]
        pieces: dict[str, list[list[torch.Tensor]]] = {n: [[] for _ in range(count[n])] for n in mine}
        offset = 0
        for r in range(world):
            for n in mine:
                for piece in pieces[n]:
                    piece.append(gathered[offset : offset + size(n, r)])
                    offset += size(n, r)
        return {n: [torch.cat(p).reshape(self.parameters[n].shape) for p in pieces[n]] for n in mine}

    def _return(self, names, results, targets):
        """To each rank its rows of ``results[n]`` (whole tensors of the names this rank owns),
        copied into ``targets[n]`` (its local tensors, in the same order)."""
        world, rank, owner = self.comm.world, self.comm.rank, self.ownership.owner
        rows, size = self._rows(names)
        like = self.local[names[0]]
        mine = [n for n in names if owner[n] == rank]
        back = [t[rows[n][d][0] : rows[n][d][1]].reshape(-1) for d in range(world) for n in mine for t in results[n]]
        back_sizes = [sum(size(n, d) * len(targets[n]) for n in mine) for d in range(world)]
        returned_sizes = [sum(size(n, rank) * len(targets[n]) for n in names if owner[n] == d) for d in range(world)]
        returned = torch.empty(sum(returned_sizes), dtype=like.dtype, device=like.device)
        self.comm.all_to_all(returned, _cat(back, like), returned_sizes, back_sizes)
        offset = 0
        for d in range(world):
            for n in names:
                if owner[n] == d:
                    for target in targets[n]:
                        target.copy_(returned[offset : offset + size(n, rank)].reshape(target.shape))
                        offset += size(n, rank)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:

        tensors, metadata = checkpoint.to_flat(self.optimizer, known=list(self.parameters))
        for key, value in list(tensors.items()):
            parsed = split_key(key)
            if parsed is not None and is_sharded(self.parameters.get(parsed[0])):
                tensors[key] = self._as_dtensor(parsed[0], value)
        rows = {n: p.shape[0] for n, p in self.parameters.items() if is_sharded(p)}
        return {"tensors": tensors, "metadata": encode(global_metadata(self.comm, metadata, rows))}

    def _as_dtensor(self, name, local):
        # loads only with FSDP2 parameters
        from torch.distributed.tensor import DTensor

        param = self.parameters[name]
        assert isinstance(param, DTensor)  # a sharded parameter's slot
        return DTensor.from_local(
            local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, check_hyperparameters: bool = True
    ) -> LoadReport:

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
