"""``MultiOptimizer``: each parameter goes to the first optimizer whose filter accepts it.

The route of a path is decided once, the first time the path is seen, from the parameter
(not the gradient), and reused on every later step: filters are not called again for known
paths, so a filter that looks at values or dtypes cannot move a parameter away from its
state. The caller's tree structure is kept exactly, whatever the number of optimizers.

Beyond ``mlx.optimizers``: routing checks (unmatched parameters, filters that match
nothing, overlaps, optimizers' own guards), frozen parameters, one learning-rate schedule
for every group, whole-model operations (global clipping, a non-finite guard,
accumulation with per-group frequencies), changes during training (freeze, unfreeze,
reroute) and :meth:`plan`, which shows all of it.
"""

from treeopt import whole_model
from treeopt._trees import dotted
from treeopt.errors import TreeoptError, describe, warn
from treeopt.filters import as_filter
from treeopt.optimizer import Optimizer

_CHOICES = {"on_unmatched": ("fallback", "warn", "error"), "guards": ("warn", "error", "off")}


class RoutingError(TreeoptError, ValueError):
    """A parameter cannot be routed: a filter failed, or a check set to ``"error"``."""


class RoutingWarning(UserWarning):
    """A routing check set to ``"warn"`` found something."""


def _accept_all(path, weight):
    return True


def _default_names(optimizers):
    names = []
    for optimizer in optimizers:
        base = type(optimizer).__name__
        count = sum(n == base or n.startswith(base + "_") for n in names)
        names.append(base if count == 0 else f"{base}_{count}")
    return names


class MultiOptimizer(Optimizer):
    """Different optimizers for different parameters.

    Args:
        optimizers (list[Optimizer]): the optimizers; the last one takes every parameter that
            no filter accepts.
        filters (list[Callable[[str, array], bool]]): one predicate per optimizer but the
            last, called as ``filter(path, parameter)`` with the dotted path (for example
            ``"layers.0.attn.weight"``) and the parameter. The first filter that returns a
            true value wins. :mod:`treeopt.filters` has ready ones that compose.

    Keyword-only options (all off by default, which is MLX's behaviour):
        names (list[str]): a name per optimizer, shown in plans and stored in checkpoints
            (default: the class names, numbered when repeated).
        frozen (filter): parameters it accepts belong to no group: no state, never updated.
        on_unmatched: ``"fallback"`` (as MLX), ``"warn"`` or ``"error"`` when a parameter
            is accepted by no filter and only the fallback takes it.
        guards: ``"warn"`` (default), ``"error"`` or ``"off"`` when an optimizer declares a
            parameter unsuited (``Muon`` and vectors, embeddings, output heads).
        lr_schedule (callable): a multiplier of the step applied to every optimizer's learning
            rate, so one warm-up and decay drives all groups and keeps their ratios.
        max_grad_norm (float): clip the global norm of all gradients (all groups together).
        skip_nonfinite (bool): when any gradient is NaN or infinite, skip the step for every
            group (nothing changes; ``state["skipped_steps"]`` counts them).
        accumulate (int or list[int]): average gradients over this many calls before a step;
            a list gives each optimizer its own update frequency.

    Example:
        >>> import numpy as np
        >>> import treeopt as optim
        >>> params = {"w": np.ones((4, 4), np.float32), "b": np.zeros(4, np.float32)}
        >>> opt = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)],
        ...                            [lambda path, p: p.ndim == 2])
        >>> opt.update(params, {"w": np.ones((4, 4), np.float32), "b": np.ones(4, np.float32)})
        >>> opt.route("w"), opt.route("b")
        (0, 1)
    """

    def __init__(self, optimizers, filters=(), *, names=None, frozen=None, on_unmatched="fallback", guards="warn",
                 lr_schedule=None, max_grad_norm=None, skip_nonfinite=False, accumulate=1):
        super().__init__()
        optimizers, filters = list(optimizers), list(filters)
        if len(filters) != len(optimizers) - 1:
            raise ValueError(f"Given {len(filters)} filters but {len(optimizers) - 1} needed.")
        for i, child in enumerate(optimizers):
            if not isinstance(child, Optimizer):
                raise TypeError(f"MultiOptimizer: optimizers[{i}] is a {type(child).__name__}, not an Optimizer")
        for i, fn in enumerate(filters):
            if not callable(fn):
                raise TypeError(f"MultiOptimizer: filters[{i}] is a {type(fn).__name__}, not a callable")
        if names is not None and (len(names) != len(optimizers) or len(set(names)) != len(names)):
            raise ValueError(f"MultiOptimizer: names must be {len(optimizers)} distinct strings, got {names!r}")
        for option, value in (("on_unmatched", on_unmatched), ("guards", guards)):
            if value not in _CHOICES[option]:
                raise ValueError(f"MultiOptimizer: {option} must be one of {_CHOICES[option]}, got {value!r}")
        self.optimizers = optimizers
        self.filters = filters + [_accept_all]
        self.names = list(names) if names is not None else _default_names(optimizers)
        self.frozen = None if frozen is None else as_filter(frozen)
        self.on_unmatched, self.guards = on_unmatched, guards
        self.whole_model = whole_model.Options(max_grad_norm, skip_nonfinite, accumulate, len(optimizers))
        self._routes = {}  # keys of a parameter -> index of its optimizer
        self._matched = {}  # keys -> every filter that accepts the parameter
        self._notes = {}  # keys -> guard findings
        self._frozen = {}  # keys -> (shape, dtype) of frozen parameters
        self._unfrozen = set()  # keys unfrozen by hand: the frozen filter no longer applies
        self._rerouted = set()  # keys moved by reroute(): no filter decided their route
        self._info = {}  # keys -> (shape, dtype) of every path routed or frozen, in the order first seen
        self._pending = {}  # decisions of a step that has not committed yet
        self._warned = set()
        self.changes = []  # freezes, unfreezes and re-routes, in order
        #: ``None``, or a function giving the global gradient norm of the step when this
        #: optimizer sees only some of the gradients (set by treeopt.distributed under ZeRO-1)
        self.shared_norm = None
        self._state = {"states": [o.state for o in optimizers]}
        self.lr_schedule = None
        if lr_schedule is not None:
            self._scale_learning_rates(lr_schedule)

    def __repr__(self):
        return f"MultiOptimizer([{', '.join(map(repr, self.optimizers))}])"

    # ------------------------------------------------------------------ routing
    def _filter_name(self, i):
        if i == len(self.filters) - 1:
            return "fallback"
        return f"filters[{i}] ({getattr(self.filters[i], 'name', None) or getattr(self.filters[i], '__name__', type(self.filters[i]).__name__)})"

    def _route(self, leaf):
        """The first accepting filter, and every other filter that accepts too."""
        chosen, also = None, []
        for i, fn in enumerate(self.filters[:-1]):
            try:
                accepted = fn(leaf.path, leaf.param)
            except Exception as error:
                if chosen is not None:
                    continue  # only the overlap report needed it
                raise RoutingError(
                    f"MultiOptimizer: {self._filter_name(i)} raised {type(error).__name__}: {error} "
                    f"on {describe(leaf.path)}") from error
            if accepted:
                if chosen is None:
                    chosen = i
                else:
                    also.append(i)
        if chosen is None:
            chosen = len(self.filters) - 1
            if self.on_unmatched != "fallback" and len(self.filters) > 1:
                self._report(self.on_unmatched, f"{describe(leaf.path)} is accepted by no filter; it goes to the "
                                                f"fallback optimizer {self.names[chosen]}", ("unmatched", leaf.keys))
        return chosen, tuple(also)

    def _guard(self, leaf, owner):
        reason = owner.unsuited(leaf.path, leaf.param)
        if reason and self.guards != "off":
            self._report(self.guards, f"{describe(leaf.path)}: {reason}", ("guard", leaf.keys))
        return (reason,) if reason else ()

    def _report(self, how, message, key):
        if how == "error":
            raise RoutingError(f"MultiOptimizer: {message}")
        if key not in self._warned:
            self._warned.add(key)
            warn(message, RoutingWarning)

    def _plan(self, leaves):
        self._pending = {}
        indices = []
        for leaf in leaves:
            if leaf.keys in self._frozen:
                indices.append(None)
                continue
            i = self._routes.get(leaf.keys)
            if i is None:
                decided = self._pending.get(leaf.keys)
                if decided is None:
                    if (self.frozen is not None and leaf.keys not in self._unfrozen
                            and self.frozen(leaf.path, leaf.param)):
                        decided = self._pending[leaf.keys] = ("frozen", leaf)
                    else:
                        decided = self._pending[leaf.keys] = self._route(leaf) + ((), leaf)
                i = None if decided[0] == "frozen" else decided[0]
            indices.append(i)
        owners = [None] * len(leaves)
        for i, child in enumerate(self.optimizers):
            mine = [j for j, k in enumerate(indices) if k == i]
            if mine:
                for j, owner in zip(mine, child._plan([leaves[j] for j in mine])):
                    owners[j] = owner
        for leaf, owner in zip(leaves, owners):  # guards, for new paths only
            decided = self._pending.get(leaf.keys)
            if owner is not None and decided is not None and decided[0] != "frozen":
                self._pending[leaf.keys] = decided[:2] + (self._guard(leaf, owner), leaf)
        return owners

    def _commit(self, backend):
        for keys, decided in self._pending.items():
            leaf = decided[-1]
            self._info[keys] = (tuple(leaf.backend.shape(leaf.param)), leaf.backend.dtype_name(leaf.param))
            if decided[0] == "frozen":
                self._frozen[keys] = self._info[keys]
            else:
                self._routes[keys], self._matched[keys] = decided[0], decided[1]
                if decided[2]:
                    self._notes[keys] = decided[2]
        if self._pending:
            self._version += 1
            self._warn_dead_filters()
        self._pending = {}
        for child in self.optimizers:
            child._commit(backend)

    def _dead_filters(self):
        """Indices of the filters that no routed parameter went through."""
        used = set(self._routes.values())
        return [i for i in range(len(self.filters) - 1) if i not in used]

    def _plan_warnings(self):
        return [f"{self._filter_name(i)} matches no parameter" for i in self._dead_filters()]

    def _warn_dead_filters(self):
        for i in self._dead_filters():
            if ("dead", i) not in self._warned:
                self._warned.add(("dead", i))
                warn(f"MultiOptimizer: {self._filter_name(i)} matches no parameter, so "
                     f"{self.names[i]} updates nothing", RoutingWarning)

    def _optimizers(self):
        return [o for child in self.optimizers for o in child._optimizers()]

    _SNAPSHOT = ("_routes", "_matched", "_notes", "_frozen", "_unfrozen", "_rerouted", "_info", "_warned",
                 "_version", "_compiled")

    def _bookkeepers(self):
        return [self] + [o for child in self.optimizers for o in child._bookkeepers()]

    def _named_optimizers(self, name=None, position=()):
        found = []
        for i, (child_name, child) in enumerate(zip(self.names, self.optimizers)):
            full = child_name if name is None else f"{name}/{child_name}"
            found.extend(child._named_optimizers(full, position + (i,)))
        return found

    def _routing_table(self):
        table = []
        for keys in self._info:
            if keys in self._frozen:
                table.append((keys, None, "frozen", (), ()))
                continue
            i = self._routes[keys]
            child = self.optimizers[i]
            if isinstance(child, MultiOptimizer):
                for _, leaf, rule, also, notes in [row for row in child._routing_table() if row[0] == keys]:
                    table.append((keys, leaf, f"{self._filter_name(i)} > {rule}", also, notes))
            else:
                rule = "rerouted" if keys in self._rerouted else self._filter_name(i)
                table.append((keys, child, rule, self._matched.get(keys, ()), self._notes.get(keys, ())))
        return table

    def route(self, path):
        """The index of the optimizer that owns ``path`` (a dotted path or keys tuple), or
        ``None`` for a path not seen yet or frozen."""
        keys = self._keys_of(path)
        return None if keys is None or keys in self._frozen else self._routes.get(keys)

    def overlaps(self):
        """``{path: [every filter index that accepts it]}`` for parameters accepted by more
        than one filter (the first still wins)."""
        return {dotted(k): [self._routes[k], *also] for k, also in self._matched.items() if also}

    # ------------------------------------------------------------------ changes during training
    def _keys_of(self, path):
        if isinstance(path, tuple):
            return path
        return next((keys for keys in self._info if dotted(keys) == path), None)

    def _select(self, which):
        """Known parameters (routed or frozen) selected by a path, a list of paths, or a filter."""
        known = self._info
        if isinstance(which, (str, tuple)):
            which = [which]
        if callable(which):
            fn = as_filter(which)
            return [k for k in known if fn(dotted(k), _Shape(self._shape_of(k)))]
        selected = []
        for path in which:
            keys = self._keys_of(path)
            if keys is None:
                raise KeyError(f"MultiOptimizer: no known parameter {path!r} (take a step or call init first)")
            selected.append(keys)
        return selected

    def _info_of(self, keys):
        """``(shape, dtype)`` of a known parameter."""
        return self._info.get(keys, ((), "?"))

    def _shape_of(self, keys):
        return self._info_of(keys)[0]

    def _leaf_owner(self, keys):
        i = self._routes.get(keys)
        if i is None:
            return None
        child = self.optimizers[i]
        return child._leaf_owner(keys) if isinstance(child, MultiOptimizer) else child

    def _step_number(self):
        from treeopt.optimizer import _as_float

        return int(_as_float(self.step))

    def freeze(self, which):
        """Stop updating the selected parameters (a path, paths, or a filter). Their state is
        kept, so :meth:`unfreeze` resumes where they stopped."""
        selected = [k for k in self._select(which) if k not in self._frozen]
        for keys in selected:
            self._frozen[keys] = self._info_of(keys)
        self._version += 1
        if selected:
            self.changes.append(f"step {self._step_number()}: froze {', '.join(dotted(k) for k in selected)}")
        return [dotted(k) for k in selected]

    def unfreeze(self, which):
        """Update the selected frozen parameters again (routed by the filters if they never
        had a route)."""
        selected = [k for k in self._select(which) if k in self._frozen]
        for keys in selected:
            del self._frozen[keys]
            self._unfrozen.add(keys)
        self._version += 1
        if selected:
            self.changes.append(f"step {self._step_number()}: unfroze {', '.join(dotted(k) for k in selected)}")
        return [dotted(k) for k in selected]

    def reroute(self, which, to, state="reset"):
        """Move the selected parameters to optimizer ``to`` (an index or a name).

        Args:
            state: ``"reset"``: the new optimizer starts from zero slots; ``"carry"``: slots
                that both optimizers have (e.g. AdamW's ``m`` and ``v`` into Adam) are carried
                over when shapes and dtypes fit, the others start from zero.
        """
        if state not in ("reset", "carry"):
            raise ValueError(f"reroute: state must be 'reset' or 'carry', got {state!r}")
        target = self.names.index(to) if isinstance(to, str) and to in self.names else to
        if not isinstance(target, int) or not 0 <= target < len(self.optimizers):
            raise IndexError(f"reroute: there is no optimizer {to!r} (names: {self.names})")
        moved = []
        self._version += 1
        for keys in self._select(which):
            old = self._routes.get(keys)
            if old == target:
                continue
            owner = self._leaf_owner(keys)
            slots = owner._drop(keys) if owner is not None else {}
            self._routes[keys] = target
            self._rerouted.add(keys)
            self._matched.pop(keys, None)
            self._notes.pop(keys, None)
            new_owner = self.optimizers[target]
            kept = {}
            if state == "carry" and slots and owner is not None and not isinstance(new_owner, MultiOptimizer):
                kept = _carry(owner, new_owner, slots)
                new_owner._carried[keys] = kept
            moved.append(keys)
            carried = f", carrying {', '.join(sorted(kept))}" if kept else ", state reset"
            self.changes.append(f"step {self._step_number()}: rerouted {dotted(keys)} from "
                                f"{self.names[old] if old is not None else 'nowhere'} to {self.names[target]}{carried}")
        return [dotted(k) for k in moved]

    # ------------------------------------------------------------------ schedules for every group
    def _scale_learning_rates(self, multiplier):
        if not callable(multiplier):
            raise TypeError("MultiOptimizer: lr_schedule must be a callable of the step (a multiplier)")
        self.lr_schedule = multiplier
        for _, _, leaf in self._named_optimizers():
            if "learning_rate" not in leaf.state:
                continue
            base = leaf._schedulers.get("learning_rate")
            if base is None:
                from treeopt.optimizer import _as_float

                base = _as_float(leaf.state["learning_rate"])
            leaf._maybe_schedule("learning_rate", _Scaled(base, multiplier))

    @property
    def lr_multiplier(self):
        """The value of ``lr_schedule`` that the next step uses (``None`` without one)."""
        from treeopt.optimizer import _as_float

        return None if self.lr_schedule is None else _as_float(self.lr_schedule(self.step))

    # ------------------------------------------------------------------ whole-model operations
    def _prepare_step(self, leaves, owners):
        return whole_model.prepare(self, leaves, owners)

    # ------------------------------------------------------------------ state and scalars
    @property
    def state(self) -> dict:
        """``{"states": [state of each optimizer]}``; the same dict on every read."""
        states = self._state.get("states")
        if not isinstance(states, list):
            states = self._state["states"] = []
        states[:] = [o.state for o in self.optimizers]
        return self._state

    @state.setter
    def state(self, state):
        if not isinstance(state, dict) or "states" not in state:
            raise ValueError("MultiOptimizer.state must be a dict {'states': [one state per optimizer]}")
        states = state["states"]
        if not isinstance(states, (list, tuple)) or len(states) != len(self.optimizers):
            count = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
            raise ValueError(
                f"MultiOptimizer has {len(self.optimizers)} optimizers but the state holds {count} states")
        for i, (child, child_state) in enumerate(zip(self.optimizers, states)):
            try:
                child.state = child_state
            except (TypeError, ValueError) as error:
                raise type(error)(f"states[{i}]: {error}") from error
        state["states"] = list(states)
        self._state = state
        self._version += 1

    @property
    def step(self):
        """The number of steps taken (every optimizer counts every step it takes)."""
        return self.optimizers[0].step

    @property
    def learning_rate(self):
        """One learning rate per optimizer (``None`` for one without)."""
        return [getattr(o, "learning_rate", None) for o in self.optimizers]

    @learning_rate.setter
    def learning_rate(self, values):
        if not isinstance(values, (list, tuple)):
            raise TypeError(
                f"MultiOptimizer has {len(self.optimizers)} learning rates, one per optimizer; set them "
                "all with a list (e.g. multi.learning_rate = [0.02, 3e-4]) or one with "
                "multi.optimizers[i].learning_rate = value")
        if len(values) != len(self.optimizers):
            raise ValueError(f"MultiOptimizer has {len(self.optimizers)} optimizers but got {len(values)} learning rates")
        for child, value in zip(self.optimizers, values):
            if value is not None:
                child.learning_rate = value


def _carry(old, new, slots):
    """The slots of ``old`` that mean the same in ``new`` (e.g. AdamW's m and v into Adam),
    under ``new``'s slot names. A slot carries only to a slot of the same meaning: Adam's
    second moment ``v`` never becomes SGD's momentum buffer ``v``."""
    old_meanings = old.rule.slot_meanings if old.rule is not None else {}
    new_meanings = new.rule.slot_meanings if new.rule is not None else {}
    by_meaning = {old_meanings[name]: value for name, value in slots.items() if name in old_meanings}
    return {name: by_meaning[meaning] for name, meaning in new_meanings.items() if meaning in by_meaning}


class _Scaled:
    """A learning rate (a number or a schedule) times a shared multiplier schedule."""

    def __init__(self, base, multiplier):
        self.base, self.multiplier = base, multiplier

    def __call__(self, step):
        base = self.base(step) if callable(self.base) else self.base
        return base * self.multiplier(step)

    def __repr__(self):
        return f"{self.base!r} x {getattr(self.multiplier, '__name__', 'schedule')}"


class _Shape:
    """Stands in for a parameter when a filter selects known paths by name and shape."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)
