"""``treeopt.torch.Optimizer``: a ``torch.optim.Optimizer`` whose step is a treeopt optimizer.

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

Parameters are routed by their canonical names (``blocks.0.attn.weight``, wrapper prefixes
removed: :func:`treeopt.torch.canonical_name`) when the optimizer is built, and updated in
place under ``torch.no_grad()``; a parameter whose ``.grad`` is ``None`` or that does not
require grad is skipped (its state is kept). Tied weights (one tensor under two names) are
updated once, under the first name. State slots live on each parameter's device.

What torch code expects is there: ``param_groups`` (one per treeopt optimizer of a
``MultiOptimizer``, whose edits reach treeopt before the next step, so every
``torch.optim.lr_scheduler`` works), ``state`` by parameter, ``add_param_group``, step hooks,
``zero_grad``, ``GradScaler``, and a ``state_dict`` that is both treeopt's name-keyed
checkpoint and torch's layout (for ``torch.distributed.checkpoint``). Parameters added to the
model later are noticed at the next step (see :meth:`Optimizer.refresh`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from operator import is_
from typing import TYPE_CHECKING, Any

import torch

from treeopt import engine
from treeopt._trees import dotted
from treeopt.optimizer import Optimizer as _TreeoptOptimizer, step_lock
from treeopt.torch import state_dict as _layout
from treeopt.torch.groups import TORCH_NAMES, Edit, ParamGroups, edit, plain, same_groups, shortest
from treeopt.torch.names import canonical_name, module_kinds, named_parameters

if TYPE_CHECKING:
    import torch.distributed as dist

    from treeopt.checkpoint.format import LoadReport
    from treeopt.plan import Plan

__all__ = ["Optimizer"]

# Every parameter or module registered on any nn.Module bumps this count, so an optimizer
# knows in O(1) whether its model may have changed since it last looked.
_registrations = [0]


def _count_registration(module, name, value):
    _registrations[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)

#: group keys that are not hyper-parameters
_STRUCTURE = ("params", "param_names", "name")


def _named(model):
    """``{canonical name: parameter}`` of a module or of an iterable of ``(name, parameter)``
    pairs or of parameters (named ``"0"``, ``"1"``...), each tensor once."""
    if isinstance(model, torch.nn.Module):
        return named_parameters(model)
    if isinstance(model, torch.Tensor):
        raise TypeError("treeopt.torch.Optimizer expects a model or its named_parameters(), got one tensor")
    items = list(model)
    if items and isinstance(items[0], dict):
        raise TypeError(
            "treeopt.torch.Optimizer does not take torch-style parameter groups ([{'params': ..., 'lr': ...}]): "
            "treeopt routes parameters by name. Pass the model (or model.named_parameters()) and express the "
            "groups as a MultiOptimizer, e.g. MultiOptimizer([AdamW(1e-3), AdamW(1e-4)], "
            "[filters.glob('head.*')]); see docs/torch.md"
        )
    if items and isinstance(items[0], torch.Tensor):
        items = [(str(i), p) for i, p in enumerate(items)]
    result, seen = {}, set()
    for entry in items:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], torch.Tensor)):
            raise TypeError(f"expected (name, parameter) pairs or parameters, got {type(entry).__name__}")
        name, param = entry
        if id(param) in seen:
            continue
        seen.add(id(param))
        result[canonical_name(name)] = param
    return result


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that steps with a treeopt optimizer.

    Args:
        model: a ``torch.nn.Module`` (wrapped by ``torch.compile``, DDP or not), or an iterable
            of ``(name, parameter)`` pairs, or of parameters (named ``"0"``, ``"1"``...).
            Torch-style lists of parameter groups are refused (``TypeError``): groups are the
            optimizers of a ``MultiOptimizer``.
        optimizer: any treeopt optimizer, e.g. a ``MultiOptimizer``.

    ``param_groups[i]`` belongs to the i-th optimizer holding state (``name``, ``lr``, and that
    optimizer's hyper-parameters: ``betas``, ``momentum``, ``weight_decay``, ``eps``...). An
    edit (by hand or by an LR scheduler) is checked and applied before the next step; a
    hyper-parameter on a treeopt schedule is shown at its next value and refuses edits.
    """

    _groups: list[dict[str, Any]]  # a ParamGroups once built

    # ``sharding`` and ``process_group`` change how step() runs the treeopt optimizer on
    # several ranks (treeopt.distributed), never the groups.
    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        optimizer: _TreeoptOptimizer,
        sharding: str | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not isinstance(optimizer, _TreeoptOptimizer):
            raise TypeError(f"expected a treeopt optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.model = model if isinstance(model, torch.nn.Module) else None
        self.parameters = _named(model)  # canonical name -> parameter: the model's, then added ones
        if not self.parameters:
            raise ValueError("treeopt.torch.Optimizer got no parameters")
        self._added: dict = {}  # name -> parameter given to add_param_group that the model does not hold
        self._seen = _registrations[0]
        self._check_known_paths()
        self._leaves = [leaf for _, _, leaf in optimizer.named_stateful()]
        self._group_names = [name for name, _, _ in optimizer.named_stateful()]
        self._group_of: dict = {}  # name -> group index; None: frozen by the MultiOptimizer
        self._declare_kinds(self.parameters)
        self._route([n for n, p in self.parameters.items() if p.requires_grad])
        self._unrouted = {n for n, p in self.parameters.items() if not p.requires_grad}  # routed once they do
        self._published = [self._group_values(i) for i in range(len(self._leaves))]
        self._lists: list = [None] * len(self._leaves)  # per group: its params and param_names, as set
        groups = [dict(self._published[i], **self._members(i)) for i in range(len(self._leaves))]
        shared = set.intersection(*(set(values) for values in self._published)) - {"name"}
        self._building = True
        super().__init__(groups, {k: v for k, v in self._published[0].items() if k in shared})
        self._groups = ParamGroups(self._groups)
        self._building = False
        from treeopt.distributed import attach

        # None in one process; DDP checks, ZeRO-1 (sharding="zero1") or FSDP2 parameters
        self._distributed = attach(self, sharding, process_group, self.model)

    def __repr__(self) -> str:
        return f"treeopt.torch.Optimizer({len(self.parameters)} parameters, {self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:  # torch's keeps defaults, state and param_groups: here views of the rest
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ what torch reads
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """One dict per treeopt optimizer that holds state (parameters noticed first)."""
        self.refresh()
        return self._groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        if getattr(self, "_building", True):  # torch.optim's __init__ sets [] first
            self._groups = groups
            return
        same_groups(groups, self._groups, self._group_names)  # wrappers set the same dicts back
        self._groups = ParamGroups(groups)
        self._regroup()

    @property  # type: ignore[override]  # keyed by name as well as by tensor
    def state(self) -> ParameterState:
        """The treeopt state by parameter: ``{parameter: {slot name: tensor}}`` for every
        parameter with state (also readable by name: ``opt.state["blocks.0.weight"]``)."""
        return ParameterState(self)

    @state.setter
    def state(self, value: object) -> None:
        if not getattr(self, "_building", False) or value:
            raise TypeError(
                "treeopt.torch.Optimizer.state is a view of the treeopt state: write into its slot "
                "tensors, or use load_state_dict"
            )

    # ------------------------------------------------------------------ routing
    def _check_known_paths(self):
        """A treeopt optimizer planned on wrapper names (``_orig_mod.x``) would keep a second
        state under the canonical name: refuse it."""
        known = [placement.keys for placement in self.optimizer.routing_table()]
        stale = [p for p in map(dotted, known) if canonical_name(p) != p and canonical_name(p) in self.parameters]
        if stale:
            raise ValueError(
                f"the optimizer already routed {stale[:3]} under a wrapper's name; treeopt.torch names parameters "
                f"canonically ({canonical_name(stale[0])!r}): plan it with treeopt.torch.named_parameters(model), "
                "or pass it fresh"
            )

    def _declare_kinds(self, named):
        if self.model is not None:  # read by routing (an optimizer that does not route ignores them)
            kinds = module_kinds(self.model)
            self.optimizer.declare_kinds({n: k for n, k in kinds.items() if n in named})

    def _route(self, names, check=None):
        """Route ``names`` now, as a step would, without creating state; ``check(owners)`` may
        refuse the routes before they are recorded."""
        if not names:
            return
        params = {n: self.parameters[n] for n in names}
        leaves = engine.collect(params, params, type(self.optimizer).__name__, check_pairs=False)
        backend = engine.settle_backend(self.optimizer, leaves)
        owners = self.optimizer.assign_owners(leaves)
        group = {id(leaf): i for i, leaf in enumerate(self._leaves)}
        indices = {leaf.path: None if owner is None else group[id(owner)] for leaf, owner in zip(leaves, owners)}
        if check is not None:
            check(indices)
        self.optimizer.commit(backend)
        self._group_of.update(indices)

    def _members(self, i):
        """Group ``i``'s ``params`` and ``param_names``, remembered so that a hand edit of
        either list is found (:meth:`_check_groups`)."""
        names = [n for n, g in self._group_of.items() if g == i]
        members = {"params": [self.parameters[n] for n in names], "param_names": names}
        self._lists[i] = (members["params"], members["param_names"], tuple(members["params"]), tuple(names))
        return members

    def _regroup(self):
        for i, group in enumerate(self._groups):
            group.update(self._members(i))

    def refresh(self) -> None:
        """Notice parameters added to (or replaced in, or removed from) the model, and
        parameters that now require grad: route them (their state is created at their first
        step). Cheap when nothing changed: ``step()`` and ``param_groups`` call it.

        Parameters registered on an ``nn.Module`` (attribute assignment, ``register_parameter``,
        ``add_module``, ``ModuleList.append``...) are noticed; call it after writing into
        ``module._parameters`` by hand."""
        changed = False
        if self.model is not None and self._seen != _registrations[0]:
            self._seen = _registrations[0]
            changed = self._rescan()
        if self._unrouted:
            now = [n for n in self._unrouted if self.parameters[n].requires_grad]
            if now:
                self._route(now)
                self._unrouted.difference_update(now)
                changed = True
        if changed:
            self._regroup()

    def _rescan(self):
        current = named_parameters(self.model)
        before = {n: p for n, p in self.parameters.items() if n not in self._added}
        added = [n for n in current if n not in before]
        replaced = [n for n in current if n in before and current[n] is not before[n]]
        removed = [n for n in before if n not in current]
        if not (added or replaced or removed):
            return False
        for name in replaced + removed:
            self._forget(name, "replaced" if name in current else "removed")
        self.parameters = {**current, **{n: p for n, p in self._added.items() if n not in current}}
        self._declare_kinds(added)
        self._route([n for n in added + replaced if self.parameters[n].requires_grad])
        self._unrouted |= {n for n in added + replaced if not self.parameters[n].requires_grad}
        return True

    def _forget(self, name, why):
        """Drop the state of a parameter that left the model or was replaced by another tensor
        (a new head must not inherit the old one's moments)."""
        group = self._group_of.pop(name, None)
        self._unrouted.discard(name)
        if group is None:
            return
        owner = self._leaves[group]
        if engine.slots_at(owner, (name,)):
            engine.drop(owner, (name,))
            self.optimizer.note_change(f"{why} {name} in the model, its state reset")
        if why == "replaced":
            self.optimizer.book.version += 1  # a compiled step re-plans

    def add_param_group(self, param_group: dict) -> None:
        """Add parameters, as ``torch.optim`` does, to the groups treeopt already has.

        ``param_group["params"]``: tensors or ``(name, tensor)`` pairs; a tensor of the model
        keeps its canonical name, another one is named ``added.N``. With ``"name"`` they go to
        that group (a MultiOptimizer's optimizer name), else routing places them as it places
        any new parameter. Any other key (``"lr"``...) must equal the value of the group they
        land in: a treeopt group cannot be split."""
        if getattr(self, "_building", False):
            self._groups.append(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        with step_lock(self.optimizer):
            self._add(param_group)

    def _add(self, param_group):
        self.refresh()
        entries = self._new_entries(param_group)
        target = param_group.get("name")
        if target is not None and target not in self._group_names:
            raise ValueError(f"add_param_group: there is no group {target!r} (groups: {self._group_names})")
        wanted = {k: plain(v) for k, v in param_group.items() if k not in _STRUCTURE}

        def check(indices):
            for name, index in indices.items():
                index = self._group_names.index(target) if target is not None else index
                if index is None:
                    raise ValueError(f"add_param_group: {name!r} is frozen by the MultiOptimizer")
                for key, value in wanted.items():
                    have = plain(self._groups[index].get(key))
                    if have != value:
                        raise ValueError(
                            f"add_param_group: {name!r} goes to group {self._group_names[index]!r}, whose {key} is "
                            f"{have!r}, not {value!r}; treeopt groups are the MultiOptimizer's optimizers: add one "
                            "there, or leave the key out"
                        )

        for name, param in entries:
            self.parameters[name] = param
            if self.model is None or named_parameters(self.model).get(name) is not param:
                self._added[name] = param
        try:
            self._route([name for name, _ in entries], check)
        except BaseException:
            for name, _ in entries:
                self.parameters.pop(name, None)
                self._added.pop(name, None)
            raise
        router = dict(self.optimizer.routers()).get(())  # the optimizer itself, if it has groups
        if target is not None and router is not None:
            moving = [name for name, _ in entries if self._group_of[name] != self._group_names.index(target)]
            if moving:
                router.reroute(moving, self._group_names.index(target))
                self._group_of.update({name: self._group_names.index(target) for name in moving})
        self._regroup()

    def _new_entries(self, param_group):
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("add_param_group: params must be an ordered collection, not a set")
        known = {id(p): n for n, p in self.parameters.items()}  # tensor -> its name, given ones included
        entries = []
        for item in params:
            name, param = item if isinstance(item, tuple) else (None, item)
            if not isinstance(param, torch.Tensor):
                raise TypeError(
                    f"add_param_group: expected tensors or (name, tensor) pairs, got {type(param).__name__}"
                )
            if not param.is_leaf:
                raise ValueError("add_param_group: can't optimize a non-leaf tensor")
            name = canonical_name(name) if name is not None else known.get(id(param))
            if name is None:  # the first free added.N
                taken = set(self.parameters) | {n for n, _ in entries}
                name = next(f"added.{i}" for i in range(len(taken) + 1) if f"added.{i}" not in taken)
            if known.get(id(param), name) != name:  # one tensor, one state: torch refuses it too
                raise ValueError(
                    f"add_param_group: {name!r} is the tensor of {known[id(param)]!r}; a tensor is optimized once, "
                    "under one name"
                )
            if self._group_of.get(name) is not None:
                raise ValueError(
                    f"add_param_group: {name!r} is already in group {self._group_names[self._group_of[name]]!r}"
                )
            if self.parameters.get(name, param) is not param or name in dict(entries):
                raise ValueError(f"add_param_group: {name!r} already names another tensor")
            known[id(param)] = name
            entries.append((name, param))
        return entries

    # ------------------------------------------------------------------ groups <-> treeopt
    def _group_values(self, i):
        """Group ``i``'s name and hyper-parameters as the next step will use them."""
        leaf = self._leaves[i]
        values = {"name": self._group_names[i]}
        for key, value in leaf.current_hyperparameters().items():
            if key == "learning_rate" or key in leaf.schedules:
                value = shortest(value)
            values[TORCH_NAMES.get(key, key)] = value
        return values

    def _scheduled(self, leaf, key):
        name = next((k for k, v in TORCH_NAMES.items() if v == key), key)
        return name in leaf.schedules or any(s.startswith(f"{name}[") for s in leaf.schedules)

    def _check_groups(self):
        """Raise if a group dict lost a key, was renamed, or had its parameters edited by hand
        (a KeyError for a removed key, as torch.optim's step raises)."""
        for i, group in enumerate(self._groups):
            where = f"param_groups[{i}] ({self._group_names[i]})"
            for key in ("params", *self._published[i]):
                if key not in group:
                    raise KeyError(f"{where} has no {key!r}: a group's keys may be edited, not removed")
            if group["name"] != self._group_names[i]:
                raise ValueError(
                    f"param_groups[{i}]['name'] is the name of treeopt's group {self._group_names[i]!r}; it was "
                    f"changed to {group['name']!r}"
                )
            params, names, expected_params, expected_names = self._lists[i]
            for key, listed, expected in (("params", params, expected_params), ("param_names", names, expected_names)):
                current = group.get(key, listed)
                if current is not listed or len(current) != len(expected) or not all(map(is_, current, expected)):
                    raise ValueError(
                        f"{where}[{key!r}] was changed by hand; a group's parameters are chosen by routing: add "
                        "parameters with add_param_group (with 'name' to choose the group), move them with the "
                        "MultiOptimizer's reroute or freeze"
                    )

    def _pull(self) -> Callable[[], None]:
        """Apply the edits of param_groups to treeopt: all checked first, then all applied.
        Returns a function that undoes them (a step that fails changes nothing)."""
        self._check_groups()
        edits: list[tuple[int, str, Edit]] = []
        for i, (group, published) in enumerate(zip(self._groups, self._published)):
            for key, value in published.items():
                if key == "name" or plain(group[key]) == plain(value):
                    continue
                leaf = self._leaves[i]
                where = f"param_groups[{i}] ({self._group_names[i]})"
                if self._scheduled(leaf, key):
                    raise ValueError(
                        f"{where}: {key} was changed to {group[key]!r}, but it follows a treeopt schedule; drive it "
                        "by one or the other (a torch LR scheduler on a constant treeopt learning rate, or a "
                        "treeopt schedule). torch.distributed.checkpoint sets lr to 0 for one step on an "
                        "optimizer with no state: call opt.init() first"
                    )
                edits.append((i, key, edit(leaf, key, group[key], f"{where}[{key!r}]")))
        published_before = [dict(values) for values in self._published]
        for i, key, change in edits:
            change.apply()
            self._published[i][key] = self._groups[i][key]

        def undo() -> None:
            for _, _, change in reversed(edits):
                change.undo()
            self._published = published_before

        return undo

    def _push(self, everything=False):
        """Show the values of treeopt's schedules (and, after a load, of everything)."""
        for i, leaf in enumerate(self._leaves):
            if not (everything or leaf.schedules):
                continue
            values = self._group_values(i)
            for key, value in values.items():
                if everything or self._scheduled(leaf, key):
                    self._groups[i][key] = self._published[i][key] = value

    # ------------------------------------------------------------------ the step
    def _trainable(self):
        return {name: p for name, p in self.parameters.items() if p.requires_grad}

    def init(self) -> None:
        """Create the state of every trainable parameter now (it is otherwise created at the
        first step)."""
        with step_lock(self.optimizer):
            self.refresh()
            with torch.no_grad():
                if self._distributed is not None:
                    self._distributed.init()
                else:
                    self.optimizer.init(self._trainable())

    def plan(self) -> Plan:
        """The routing plan (:class:`treeopt.plan.Plan`) of the parameters known now."""
        self.refresh()
        if self._distributed is not None and hasattr(self._distributed, "plan"):
            return self._distributed.plan()  # ZeRO-1: with an owner column and per-rank totals
        return self.optimizer.plan()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]  # torch's two overloads in one
        """One step for every parameter that has a gradient. ``closure`` (optional)
        re-evaluates the model and returns the loss, as in torch.optim.

        Everything is checked first (the groups' edits, the gradients); a step that fails
        puts the edits it applied back, so treeopt is as it was."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with step_lock(self.optimizer):  # saves and other threads' steps wait
            self.refresh()
            params = self._trainable()
            grads = _dense_gradients(params)
            undo = self._pull()
            try:
                if self._distributed is not None:
                    self._distributed.step(grads)
                else:
                    self.optimizer.update(params, grads)
            except BaseException:
                undo()
                raise
            self._push()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.refresh()  # a parameter added since the last step has a gradient too
        for p in self.parameters.values():  # frozen by the MultiOptimizer too: in no group
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, twice over the same tensors (nothing is copied):

        - ``"tensors"`` and ``"metadata"``: treeopt's checkpoint content, keyed by parameter
          name and slot (``"blocks.0.attn.weight/m"``): see :mod:`treeopt.checkpoint`;
        - ``"state"`` and ``"param_groups"``: torch's layout (state by position in the groups,
          ``param_names`` beside ``params``, and every group's values), which
          ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` re-keys by name.

        Plain tensors and Python values: ``torch.save(..., weights_only=True)`` loads it. The
        tensors are the live state: save them before the next step changes them."""
        from treeopt import checkpoint

        with step_lock(self.optimizer):
            self.refresh()
            self._pull()  # an LR scheduler's edit after the last step is the next step's: save it
            if self._distributed is not None:  # several ranks: name-keyed only (see treeopt.distributed.state)
                return self._distributed.state_dict()
            tensors, metadata = checkpoint.to_flat(self.optimizer, known=list(self._trainable()))
            groups = []
            for i, group in enumerate(self._groups):
                values = {k: v for k, v in group.items() if k not in ("params", "param_names")}
                scheduled = {k: v for k, v in self._published[i].items() if self._scheduled(self._leaves[i], k)}
                groups.append(
                    dict(
                        values,
                        name=self._group_names[i],
                        param_names=list(self._lists[i][3]),
                        treeopt_scheduled=scheduled,
                    )
                )
            state, groups = _layout.to_torch(tensors, metadata, groups)
        return {"tensors": tensors, "metadata": metadata, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> LoadReport:  # type: ignore[override]  # strict, and the load report
        """Load a state saved by :meth:`state_dict`, or its torch layout alone (what
        ``set_optimizer_state_dict`` passes), matched by parameter name, never by position;
        everything is checked before anything changes. Returns the load report.

        As ``torch.optim`` does, the groups take the saved values (``lr``, ``betas``,
        ``momentum``, ``weight_decay``..., and keys LR schedulers keep such as
        ``initial_lr``), edits made to the dict before the load included; values on a treeopt
        schedule follow their schedule from the saved step. A parameter that does not
        require grad now keeps its saved state for when it does."""
        from treeopt import checkpoint
        from treeopt.checkpoint import validate

        if not isinstance(state_dict, dict):
            raise checkpoint.CheckpointError(f"load_state_dict expects a dict, got {type(state_dict).__name__}")
        tensors, metadata, saved_groups = _content(state_dict)
        with step_lock(self.optimizer):
            self.refresh()
            undo = self._pull()  # edits made before the load are replaced by the saved values
            try:
                validate.metadata(metadata)
                restored = self._saved_values(metadata, saved_groups)
                report = self._load(state_dict, tensors, metadata, strict)
            except BaseException:
                undo()
                raise
            for _, _, _, change in restored:
                change.apply()
            self._push(everything=True)
            for i, key, value, _ in restored:  # a torch group's value as saved, as torch.optim shows it
                if value is not None:
                    self._groups[i][key] = self._published[i][key] = value
            for saved in saved_groups:  # LR schedulers' keys (initial_lr...)
                if saved.get("name") in self._group_names:
                    i = self._group_names.index(saved["name"])
                    for key, value in saved.items():
                        if key not in self._published[i] and not key.startswith("treeopt_") and key not in _STRUCTURE:
                            self._groups[i][key] = value
        return report

    def _load(self, state_dict, tensors, metadata, strict):
        from treeopt import checkpoint

        if self._distributed is not None:  # several ranks: this rank's part, by name
            with torch.no_grad():
                return self._distributed.load_state_dict(state_dict, strict=strict, check_hyperparameters=False)
        frozen = {  # state saved for a parameter that does not require grad now: kept for later
            n: p
            for n, p in self.parameters.items()
            if not p.requires_grad and metadata["parameters"].get(n, {}).get("slots")
        }
        with torch.no_grad():  # checked, initialised and loaded together, or nothing changes
            report = checkpoint.load_content(
                self.optimizer,
                tensors,
                metadata,
                params={**self._trainable(), **frozen},
                strict=strict,
                check_hyperparameters=False,
            )
        self._record_routes(frozen)
        return report

    def _saved_values(self, metadata, saved_groups):
        """``[(group, key, value, edit)]``: the saved value of every key of every group, by
        group name (a torch-layout group's, else the metadata's hyper-parameters, whose
        ``value`` is ``None``: shown as treeopt holds it), checked as an edit is; a value on a
        treeopt schedule follows the schedule."""
        from treeopt.checkpoint import CheckpointError

        by_name = {g.get("name"): g for g in saved_groups}
        hyper = {o["name"]: o["hyperparameters"] for o in metadata["optimizers"]}
        restored = []
        for i, (leaf, name) in enumerate(zip(self._leaves, self._group_names)):
            where = f"the state dict's param_groups ({name})"
            if name in by_name:
                values, scheduled = by_name[name], by_name[name].get("treeopt_scheduled", {})
            elif name in hyper:  # name-keyed content: the learning rate is a stored scalar
                values = {TORCH_NAMES.get(k, k): v for k, v in hyper[name].items() if not isinstance(v, dict)}
                scheduled = {}
            else:
                continue
            for key, value in values.items():
                if key == "name" or key not in self._published[i]:
                    continue
                if self._scheduled(leaf, key):
                    if key in scheduled and plain(value) != plain(scheduled[key]):
                        raise CheckpointError(
                            f"{where}: {key} was changed to {value!r} in the state dict, but it follows a treeopt "
                            "schedule, which gives it its value at the saved step; change the schedule instead"
                        )
                    continue
                try:
                    change = edit(leaf, key, value, f"{where}[{key!r}]")
                    restored.append((i, key, value if name in by_name else None, change))
                except ValueError as error:
                    raise CheckpointError(str(error)) from None
        return restored

    def _record_routes(self, loaded):
        """Record where the parameters ``loaded`` (frozen, with saved state) went."""
        group = {id(leaf): i for i, leaf in enumerate(self._leaves)}
        for name in loaded:
            owner = self.optimizer.owner_of((name,))
            self._group_of[name] = None if owner is None else group[id(owner)]
            self._unrouted.discard(name)
        if loaded:
            self._regroup()


def _content(state_dict):
    """``(tensors, metadata, groups)`` of a state dict: treeopt's content, or torch's layout
    alone; ``groups`` are torch-layout groups (``[]`` for name-keyed content alone)."""
    from treeopt.checkpoint import CheckpointError
    from treeopt.distributed.state import decode

    groups = state_dict.get("param_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"the state dict's param_groups must be a list of dicts, got {type(groups).__name__}")
    if "tensors" in state_dict and "metadata" in state_dict:
        try:
            metadata = decode(state_dict["metadata"])
        except ValueError as error:
            raise CheckpointError(f"the state dict's metadata is not JSON: {error}") from error
        return state_dict["tensors"], metadata, groups
    if "state" in state_dict and "param_groups" in state_dict:
        try:
            tensors, metadata = _layout.from_torch(state_dict)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"not a treeopt.torch state dict ({type(error).__name__}: {error})") from error
        return tensors, metadata, groups
    raise CheckpointError(
        "not a treeopt.torch state dict: it needs 'tensors' and 'metadata', or "
        f"torch's 'state' and 'param_groups' (got {sorted(state_dict)})"
    )


def _dense_gradients(params):
    """``{name: p.grad}``; a sparse gradient is refused before anything changes: every rule
    of treeopt reads its gradient as a dense array."""
    grads = {}
    for name, param in params.items():
        grad = param.grad
        if grad is not None and grad.layout != torch.strided:
            raise TypeError(
                f"the gradient of {name!r} is {'sparse' if 'sparse' in str(grad.layout) else 'not dense'} "
                f"({grad.layout}); treeopt's optimizers take dense gradients: use nn.Embedding(..., sparse=False), "
                "or set p.grad = p.grad.to_dense() before the step"
            )
        grads[name] = grad
    return grads


class ParameterState(MutableMapping):
    """``optimizer.state`` as torch code reads it: parameter -> slot dict (the live treeopt
    slots). Keys may also be canonical names. Assigning copies into the existing slots."""

    def __init__(self, owner: Optimizer) -> None:
        self._owner = owner
        self._names = None  # id(parameter) -> name, built at the first lookup by tensor

    def _name(self, key):
        if isinstance(key, str):
            return key
        if self._names is None:
            self._names = {id(p): n for n, p in self._owner.parameters.items()}
        return self._names.get(id(key))

    def _slots(self, name):
        group = self._owner._group_of.get(name)
        return None if group is None else engine.slots_at(self._owner._leaves[group], (name,))

    def __getitem__(self, key: torch.Tensor | str) -> dict[str, torch.Tensor]:
        name = self._name(key)
        if name not in self._owner.parameters:
            raise KeyError(key)
        return self._slots(name) or {}

    def __setitem__(self, key: torch.Tensor | str, value: Mapping[str, torch.Tensor]) -> None:
        """Copy ``value`` into the slots of ``key``'s state: every slot given, each a tensor of
        the slot's shape and dtype (on any device); all are checked and moved first, then
        copied, so a bad one changes nothing."""
        with step_lock(self._owner.optimizer):
            name, slots = self._name(key), self[key]
            if not isinstance(value, Mapping):
                raise TypeError(
                    f"the state of {name!r} must be a dict of slot name -> tensor, got {type(value).__name__}"
                )
            if set(value) != set(slots):
                raise ValueError(f"the state of {name!r} has slots {sorted(slots)}, got {sorted(value)}")
            staged = {}
            for slot, tensor in value.items():
                current = slots[slot]
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(f"slot {slot!r} of {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
                if tensor.shape != current.shape or tensor.dtype != current.dtype or tensor.layout != torch.strided:
                    raise ValueError(
                        f"slot {slot!r} of {name!r} is {_spec(tensor)}; the slot is {_spec(current)} (a dense tensor of that "
                        "shape and dtype)"
                    )
                staged[slot] = tensor.detach().to(current.device)  # may allocate: before any slot is written
            with torch.no_grad():
                for slot, tensor in staged.items():
                    if tensor.data_ptr() != slots[slot].data_ptr():
                        slots[slot].copy_(tensor)

    def __delitem__(self, key: torch.Tensor | str) -> None:
        raise TypeError("the state of a parameter cannot be deleted; use the MultiOptimizer's freeze or reroute")

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for n, p in list(self._owner.parameters.items()) if self._slots(n))

    def __len__(self) -> int:
        return sum(1 for n in self._owner.parameters if self._slots(n))

    def __contains__(self, key: object) -> bool:
        name = self._name(key)
        return name in self._owner.parameters and bool(self._slots(name))

    def __repr__(self) -> str:
        return f"ParameterState({ {n: sorted(s) for n in self._owner.parameters if (s := self._slots(n))} })"


def _spec(tensor):
    return f"{tensor.dtype}{list(tensor.shape)}"
