"""FSDP2 / DTensor parameters (``fully_shard``): each rank updates its rows; a rule that
needs whole tensors runs on one owner per tensor.

Every parameter is a ``DTensor`` sharded ``Shard(0)`` on a 1-D mesh, and so is its gradient.

- Elementwise rules (AdamW, Lion...) run through the normal engine on the local shards: a
  rule on some rows is the rule on those elements. Their slots are local tensors of the
  shard's shape; :meth:`FullyShardedStep.state_dict` hands them out as DTensors with the
  parameter's placement, which ``torch.distributed.checkpoint`` reshards.
- A rule that is not elementwise (Muon: Newton-Schulz on the whole matrix), and whose slots
  are shaped like the parameter (so they are sharded like it), gets each tensor whole on one
  owner (balanced by Newton-Schulz cost, see :mod:`~treeopt.distributed.ownership`): one
  ``all_to_all_single`` per group and dtype sends every rank's rows of the gradient, the
  parameter and the slots (uneven and empty shards are uneven splits, no padding), the
  owner runs the engine's rule runner on the whole tensor once, and a second
  ``all_to_all_single`` returns the rows of the new parameter and slots.

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
            if is_sharded(param) and whole:
                self._check_split(name, param, group, rule)
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
            if is_sharded(param):  # its slots are stored as the whole tensor's rows (state_dtype)
                group.store.hold_part((name,), tuple(param.shape), start * math.prod(param.shape[1:]))
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

    def _check_split(self, name, param, group, rule):
        """A rule that needs whole tensors runs on one owner per tensor, each rank sending its
        rows of the slots with its rows of the parameter: every slot must be split by rows as
        the parameter is (Muon's momentum, NorMuon's one value per output row). Slots of
        other shapes (Adafactor's column sums, NorMuon over columns) and custom steps cannot."""
        options = self.options.get(name, ())
        shapes = None if rule is None else group.store.slot_shapes(tuple(param.shape), options=options)
        local = _ownership.row_range(param.shape[0], self.comm.world, self.comm.rank)
        rows = local[1] - local[0]
        split = shapes is not None and all(s[:1] == tuple(param.shape[:1]) for s in shapes.values())
        if shapes is not None and split and group.store.precision is not None:
            split = all(s == tuple(param.shape) for s in shapes.values())  # stored forms: in the parameter's shape
        if not split:
            raise ParameterError(
                f"treeopt: {type(group).__name__} needs whole matrices but {name!r} is sharded (FSDP2) and its state "
                f"cannot be split by rows as the parameter is ({shapes or 'a custom step'}); route it to an "
                "elementwise optimizer (AdamW...) or to one whose slots follow the parameter's rows (Muon; NorMuon "
                "with normuon='output' and (out, in) weights)",
                name,
            )
        assert shapes is not None
        mine = group.store.slot_shapes((rows, *param.shape[1:]), options=options)
        if any(mine[n] != (rows, *s[1:]) for n, s in shapes.items()):
            raise ParameterError(
                f"treeopt: the state of {name!r} cannot be split by rows as the parameter is: rank "
                f"{self.comm.rank}'s {rows} rows of {tuple(param.shape)} would keep {mine}, not rows of {shapes} "
                "(NorMuon: use normuon='output' with (out, in) weights)",
                name,
            )

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
        store, parts = group.store, group.scalars.rule.parts
        slots = {n: store.slots((n,)) for n in names}  # created at construction, in one order everywhere
        like = self.local[names[0]]
        backend = _backend(like)
        layouts = {n: store.layout(tuple(self.local[n].shape), backend.dtype_name(like), (n,)) for n in names}
        # each whole tensor's slots
        wholes = {n: store.slot_shapes(tuple(self.parameters[n].shape), (n,)) for n in names}
        if parts is not None and all(layout is None for layout in layouts.values()):
            self._run_parts(group, names, grads, slots, wholes)
            return
        # the rows of everything the rule reads to the owner, the engine's rule runner there.
        # Slots kept in another form (state_dtype) travel read back, in the dtype the rule
        # computes in, and each rank stores its rows anew: one process's bytes (int8 blocks are
        # pieces of rows; bfloat16's random bits follow the element's index in the whole tensor)
        first = layouts[names[0]]
        dtype = like.dtype if first is None else getattr(torch, first.compute)
        slot_names = {n: list(slots[n]) if layouts[n] is None else list(layouts[n].forms) for n in names}
        travel = {}  # per tensor: its gradient, parameter and slots, and the shapes of their wholes
        for n in names:
            shape = tuple(self.parameters[n].shape)
            layout = layouts[n]
            held = list(slots[n].values()) if layout is None else store.load(slots[n], layout.forms, layout)
            travel[n] = ([grads[n], self.local[n], *held], [shape, shape, *(wholes[n][s] for s in slot_names[n])])
        mine = self._exchange(names, travel, dtype)
        results = {}
        for n, (grad, param, *state) in mine.items():  # the rule runs on each whole tensor once
            pair = engine.Pair((n,), grad, param, _backend(param))
            pair.slots, pair.options = dict(zip(slot_names[n], state)), self.options[n]
            (engine.run_rule if layouts[n] is None else engine.run_plain)(group, [pair], in_place=False)
            results[n] = [pair.result, *(pair.slots[s] for s in slot_names[n])]
        returned = self._return(names, results, {n: travel[n][1][1:] for n in names}, dtype)
        for n in names:
            param, *values = returned[n]
            self.local[n].copy_(param)
            if layouts[n] is None:
                for target, value in zip(slots[n].values(), values):
                    target.copy_(value)
            else:
                noise = store.noise((n,))
                for name, value in zip(slot_names[n], values):
                    store.save(backend, slots[n], name, value, layouts[n], noise)

    def _run_parts(self, group, names, grads, slots, wholes):
        """A rule split in parts (:class:`treeopt.rules.base.Parts`): the elementwise parts on
        this rank's rows, only the direction (and the slots the whole part keeps, NorMuon's
        per-row moments) to the owner and back."""
        parts = group.scalars.rule.parts
        values, travel, kept = {}, {}, {}
        for n in names:
            local = self.local[n]
            pair = engine.Pair((n,), grads[n], local, _backend(local))
            pair.options = self.options[n]
            values[n] = engine.coefficients(group, pair)
            own = [s for s in slots[n] if s not in parts.whole_slots]
            kept[n] = [s for s in slots[n] if s in parts.whole_slots]
            direction, *state = parts.direction(grads[n], local, *(slots[n][s] for s in own), **values[n])
            for name, value in zip(own, state):
                slots[n][name].copy_(value)
            shape = tuple(self.parameters[n].shape)
            travel[n] = ([direction, *(slots[n][s] for s in kept[n])], [shape, *(wholes[n][s] for s in kept[n])])
        results = {
            n: list(parts.whole(direction, *state, **values[n]))
            for n, (direction, *state) in self._exchange(names, travel, self.local[names[0]].dtype).items()
        }
        returned = self._return(names, results, {n: travel[n][1] for n in names}, self.local[names[0]].dtype)
        for n in names:
            direction, *state = returned[n]
            for name, value in zip(kept[n], state):
                slots[n][name].copy_(value)
            shape = tuple(self.parameters[n].shape)
            self.local[n].copy_(parts.apply(self.local[n], direction, shape, **values[n]))

    def _sizes(self, names, shapes):
        """``size(n, r, k)``: the elements of rank ``r``'s rows of the ``k``-th tensor of ``n``
        (``shapes[n]``: the whole tensors' shapes, each split by rows as the parameter is)."""
        world = self.comm.world
        rows = {n: [_ownership.row_range(self.parameters[n].shape[0], world, r) for r in range(world)] for n in names}

        def size(n, r, k):
            start, stop = rows[n][r]
            return (stop - start) * math.prod(shapes[n][k][1:])

        return rows, size

    def _exchange(self, names, travel, dtype):
        """Every rank's rows of the tensors ``travel[n] = (local tensors, whole shapes)`` to
        the owner of ``n``: ``{n: [whole tensor, ...]}`` of the names this rank owns."""
        world, rank, owner = self.comm.world, self.comm.rank, self.ownership.owner
        shapes = {n: travel[n][1] for n in names}
        _, size = self._sizes(names, shapes)
        like = self.local[names[0]]
        # my rows of each tensor, grouped by destination (its owner), in plan order
        send = [t.reshape(-1).to(dtype) for d in range(world) for n in names if owner[n] == d for t in travel[n][0]]
        send_sizes = [
            sum(size(n, rank, k) for n in names if owner[n] == d for k in range(len(shapes[n]))) for d in range(world)
        ]
        receive_sizes = [
            sum(size(n, r, k) for n in names if owner[n] == rank for k in range(len(shapes[n]))) for r in range(world)
        ]
        gathered = torch.empty(sum(receive_sizes), dtype=dtype, device=like.device)
        self.comm.all_to_all(gathered, _cat(send, like, dtype), receive_sizes, send_sizes)
        mine = [n for n in names if owner[n] == rank]
        pieces: dict[str, list[list[torch.Tensor]]] = {n: [[] for _ in shapes[n]] for n in mine}
        offset = 0
        for r in range(world):
            for n in mine:
                for k, piece in enumerate(pieces[n]):
                    piece.append(gathered[offset : offset + size(n, r, k)])
                    offset += size(n, r, k)
        return {n: [torch.cat(p).reshape(shape) for p, shape in zip(pieces[n], shapes[n])] for n in mine}

    def _return(self, names, results, shapes, dtype):
        """To each rank its rows of ``results[n]`` (whole tensors of ``shapes[n]``, of the names
        this rank owns): ``{n: [this rank's rows of each]}`` for every name."""
        world, rank, owner = self.comm.world, self.comm.rank, self.ownership.owner
        rows, size = self._sizes(names, shapes)
        like = self.local[names[0]]
        mine = [n for n in names if owner[n] == rank]
        back = [
            t[rows[n][d][0] : rows[n][d][1]].reshape(-1).to(dtype)
            for d in range(world)
            for n in mine
            for t in results[n]
        ]
        count = {n: range(len(shapes[n])) for n in names}
        back_sizes = [sum(size(n, d, k) for n in mine for k in count[n]) for d in range(world)]
        returned_sizes = [sum(size(n, rank, k) for n in names if owner[n] == d for k in count[n]) for d in range(world)]
        returned = torch.empty(sum(returned_sizes), dtype=dtype, device=like.device)
        self.comm.all_to_all(returned, _cat(back, like, dtype), returned_sizes, back_sizes)
        found: dict[str, list[torch.Tensor]] = {}
        offset = 0
        for d in range(world):
            for n in names:
                if owner[n] != d:
                    continue
                start, stop = rows[n][rank]
                found[n] = []
                for k in count[n]:
                    found[n].append(
                        returned[offset : offset + size(n, rank, k)].reshape((stop - start, *shapes[n][k][1:]))
                    )
                    offset += size(n, rank, k)
        return found

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


def _cat(pieces, like, dtype=None):
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype or like.dtype, device=like.device)


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
