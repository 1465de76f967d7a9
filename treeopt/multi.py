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

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from treeopt import engine, whole_model
from treeopt._trees import dotted
from treeopt.backends import Backend, as_float
from treeopt.engine import Pair
from treeopt.errors import TreeoptError, describe, warn
from treeopt.filters import as_filter, module_kinds, normalise_kinds, routing_tree
from treeopt.optimizer import Optimizer, Placement
from treeopt.tree import is_container, tree_flatten
from treeopt.types import Array, Filter, Schedule, Tree

if TYPE_CHECKING:
    from treeopt.plan import Plan

_CHOICES = {"on_unmatched": ("fallback", "warn", "error"), "guards": ("warn", "error", "off")}


class RoutingError(TreeoptError, ValueError):
    """A parameter cannot be routed: a filter failed, or a check set to ``"error"``."""


class RoutingWarning(UserWarning):
    """A routing check set to ``"warn"`` found something."""


@dataclass(frozen=True)
class Route:
    """What a MultiOptimizer knows about one parameter path: one record per path, replaced
    (never changed in place) when something changes."""

    shape: tuple
    dtype: str
    #: index of its optimizer; ``None`` when it was frozen before it was ever routed
    group: int | None = None
    #: why it goes there: ``"filters[0] (name)"``, ``"fallback"``, ``"rerouted"``
    reason: str = ""
    #: other filters that accept it (the first one won)
    also: tuple = ()
    #: the guard findings of its optimizer
    notes: tuple = ()
    frozen: bool = False
    #: unfrozen by hand: the ``frozen`` filter no longer applies to it
    unfrozen: bool = False


def _accept_all(path, weight):
    return True


def _default_names(optimizers):
    names: list[str] = []
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

    def __init__(
        self,
        optimizers: Sequence[Optimizer],
        filters: Sequence[Filter] = (),
        *,
        names: Sequence[str] | None = None,
        frozen: Filter | None = None,
        on_unmatched: str = "fallback",
        guards: str = "warn",
        lr_schedule: Schedule | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        accumulate: int | Sequence[int] = 1,
    ) -> None:
        super().__init__()
        optimizers, filters = list(optimizers), list(filters)
        if len(filters) != len(optimizers) - 1:
            raise ValueError(f"Given {len(filters)} filters but {len(optimizers) - 1} needed.")
        for i, child in enumerate(optimizers):
            if not isinstance(child, Optimizer):
                raise TypeError(f"MultiOptimizer: optimizers[{i}] is a {type(child).__name__}, not an Optimizer")
        seen: dict = {}
        for i, child in enumerate(optimizers):
            for leaf in child.stateful():
                if id(leaf) in seen:
                    raise ValueError(
                        f"MultiOptimizer: optimizers[{i}] is (or holds) the same {type(leaf).__name__} instance as "
                        f"optimizers[{seen[id(leaf)]}]; each group needs its own optimizer (its own state and step)"
                    )
                seen[id(leaf)] = i
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
        self._routes: dict[tuple, Route] = {}  # keys of a parameter -> its Route, in the order first seen
        self._pending: dict[tuple, Route] = {}  # keys -> the Route decided by a step that has not committed yet
        self._warned: set = set()
        self.changes: list[str] = []  # freezes, unfreezes and re-routes, in order
        #: ``None``, or a function giving the global gradient norm of the step when this
        #: optimizer sees only some of the gradients (set by treeopt.distributed under ZeRO-1)
        self.shared_norm = None
        self.module_kinds: dict = {}  # path -> kinds declared by an integration (see declare_kinds)
        self._learned: weakref.ref | None = None  # the last model whose kinds were declared (see _learn)
        self._state = {"states": [o.state for o in optimizers]}
        self.lr_schedule: Schedule | None = None
        if lr_schedule is not None:
            if not callable(lr_schedule):
                raise TypeError("MultiOptimizer: lr_schedule must be a callable of the step (a multiplier)")
            self.lr_schedule = lr_schedule
            for _, _, stateful in self.named_stateful():
                stateful.scale_learning_rate(lr_schedule)

    def __repr__(self) -> str:
        return f"MultiOptimizer([{', '.join(map(repr, self.optimizers))}])"

    # ------------------------------------------------------------------ routing
    def _filter_name(self, i):
        if i == len(self.filters) - 1:
            return "fallback"
        return f"filters[{i}] ({getattr(self.filters[i], 'name', None) or getattr(self.filters[i], '__name__', type(self.filters[i]).__name__)})"

    def _route(self, leaf, known):
        """A new :class:`Route` for ``leaf``: frozen, or the first accepting filter (and every
        other filter that accepts too)."""
        if leaf.backend is None:  # revising a known route (see _revise)
            shape, dtype = leaf.param.shape, known.dtype
        else:
            shape, dtype = tuple(leaf.backend.shape(leaf.param)), leaf.backend.dtype_name(leaf.param)
        unfrozen = known is not None and known.unfrozen
        if self.frozen is not None and not unfrozen and self.frozen(leaf.path, leaf.param):
            return Route(shape, dtype, frozen=True)
        chosen, also = None, []
        for i, fn in enumerate(self.filters[:-1]):
            try:
                accepted = _truth(fn(leaf.path, leaf.param))
            except Exception as error:
                if chosen is not None:
                    continue  # only the overlap report needed it
                raise RoutingError(
                    f"MultiOptimizer: {self._filter_name(i)} raised {type(error).__name__}: {error} "
                    f"on {describe(leaf.path)}"
                ) from error
            if accepted:
                if chosen is None:
                    chosen = i
                else:
                    also.append(i)
        if chosen is None:
            chosen = len(self.filters) - 1
            if self.on_unmatched != "fallback" and len(self.filters) > 1:
                self._report(
                    self.on_unmatched,
                    f"{describe(leaf.path)} is accepted by no filter; it goes to the "
                    f"fallback optimizer {self.names[chosen]}",
                    ("unmatched", leaf.keys),
                )
        reason = self._explain(chosen, leaf.path, leaf.param)
        return Route(shape, dtype, chosen, reason, tuple(also), unfrozen=unfrozen)

    def _explain(self, chosen, path, weight):
        """The route's reason: the filter that took it, and what the parameter is when a filter
        can tell (:func:`treeopt.filters.role`). A parameter whose route only its number of
        dimensions decided is reported, once, through ``guards``."""
        reason = self._filter_name(chosen)
        own = getattr(self.filters[chosen], "explain", None)
        # another filter's explanation says what the parameter is (the fallback, a composite)
        explain = own or next((e for e in (getattr(f, "explain", None) for f in self.filters) if e is not None), None)
        if explain is None:
            return reason
        what = explain(path, weight)
        decided_by_it = own is not None or chosen == len(self.filters) - 1
        if decided_by_it and getattr(what, "by_shape_only", False) and self.guards != "off":
            self._report(
                self.guards,
                f"{describe(path)} went to {self.names[chosen]} by its number of dimensions alone: no module "
                "kind, name or place in the model says what it is. Muon if it is a hidden matrix, AdamW if "
                "it reads the input or writes the output; say which with declare_kinds({path: 'hidden'}) "
                "or 'input'/'output', or route it by name",
                ("shape", path),
            )
        return f"{reason}: {what}"

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

    def declare_kinds(self, kinds: Mapping[str, str | Iterable[str]], *, replace: bool = False) -> None:
        """Say what some parameters are, by path: ``{"tok.weight": "embedding"}`` (a kind or
        several). Filters see it through :func:`treeopt.filters.kinds_of` (``is_embedding``,
        ``is_head``, ``is_norm``, ``kind(...)``), and so do optimizers' routing guards.
        Framework integrations call it. Kinds add to those declared before, unless
        ``replace`` (a trace of the forward pass replacing guesses).

        Parameters routed before are routed again with what is now known: before the first
        step they move (the plan's reason starts with ``revised:``); after it a warning says
        which would move and how (``reroute``)."""
        changed = []
        for path, values in normalise_kinds(kinds).items():
            merged = values if replace else self.module_kinds.get(path, frozenset()) | values
            if merged != self.module_kinds.get(path):
                self.module_kinds[path] = merged
                changed.append(path)
        if changed and self._routes:
            self._revise(set(changed))

    def _revise(self, paths):
        """Route again, with the kinds now known, the parameters at ``paths`` that the filters
        routed before (a route decided from names is revised when an integration learns what
        the layer is). Before the first step the parameter moves, its reason says why; after
        it, the state it has would be lost, so a warning says what to do instead."""
        shapes = {dotted(keys): route.shape for keys, route in self._routes.items()}
        moved = []
        with module_kinds(self.module_kinds), routing_tree(shapes):
            for keys, known in list(self._routes.items()):
                path = dotted(keys)
                if path not in paths or known.frozen or known.group is None or known.reason == "rerouted":
                    continue
                try:
                    fresh = self._route(_Leaf(keys, path, _Shape(known.shape)), known)
                except RoutingError:
                    continue  # a filter that needs the array itself: the route stays as it was
                if fresh.group == known.group:
                    self._routes[keys] = replace(known, reason=fresh.reason)
                elif self._step_number() == 0:
                    owner = self.owner_of(keys)
                    if owner is not None:
                        engine.drop(owner, keys)
                    self._routes[keys] = replace(fresh, reason=f"revised: {fresh.reason}", notes=known.notes)
                    moved.append(f"{path} from {self.names[known.group]} to {self.names[fresh.group]}")
                else:
                    self._report(
                        "warn",
                        f"{describe(path)} was routed to {self.names[known.group]}; what is now known of it "
                        f"({fresh.reason}) routes it to {self.names[fresh.group]}. Steps were taken, so it stays: "
                        f"reroute({path!r}, {self.names[fresh.group]!r}) moves it",
                        ("revise", keys),
                    )
        self.book.version += 1
        if moved:
            self.changes.append(f"step 0: revised {', '.join(moved)} (module kinds learned)")

    # ------------------------------------------------------------------ models given whole
    def _learn(self, tree):
        """Declare the kinds of a framework's model given whole (an ``mlx.nn.Module``, as
        ``mlx.optimizers`` takes it), once per model object."""
        if self._learned is not None and self._learned() is tree:
            return
        if any(c.__module__.startswith("mlx.nn") for c in type(tree).__mro__):
            # an integration above this layer, imported only when an MLX model is given
            from treeopt import mlx as treeopt_mlx

            self.declare_kinds(treeopt_mlx.module_kinds(tree))
            self._learned = weakref.ref(tree)

    def _routable(self, tree):
        """``tree`` as treeopt walks it: a JAX pytree that is no dict, list or tuple (an
        ``nnx.State``, an equinox module) or holds flax's boxed leaves (``LogicallyPartitioned``)
        becomes ``{path: array}``, named as :mod:`treeopt.jax` names it (so the routes are
        those its ``init`` and ``update`` use), after its kinds are declared."""
        if is_container(tree) and not any(
            type(leaf).__module__.startswith("flax") for _, leaf in tree_flatten(tree, is_leaf=_is_box)
        ):
            return tree
        if "jax" not in sys.modules:
            return tree
        from treeopt import jax as treeopt_jax  # an integration above this layer, for JAX trees only

        treeopt_jax.declare_kinds(self, tree)
        return treeopt_jax.named_leaves(tree)

    def plan(self, params: Tree | None = None) -> Plan:
        return super().plan(None if params is None else self._routable(params))

    def update(self, model: Tree, gradients: Tree) -> None:
        self._learn(model)
        super().update(model, gradients)

    def apply_gradients(self, gradients: Tree, parameters: Tree) -> Tree:
        self._learn(parameters)
        return super().apply_gradients(gradients, parameters)

    def init(self, parameters: Tree) -> None:
        self._learn(parameters)
        super().init(self._routable(parameters))

    def assign_owners(self, pairs: list[Pair]) -> list:
        with module_kinds(self.module_kinds):
            if all(pair.keys in self._routes for pair in pairs):
                return self._assign_owners(pairs)
            with routing_tree({dotted(pair.keys): pair.backend.shape(pair.param) for pair in pairs if pair.backend}):
                return self._assign_owners(pairs)

    def _assign_owners(self, pairs):
        self._pending = {}
        groups = [self.group_of(pair.keys) for pair in pairs]
        for k, pair in enumerate(pairs):
            if groups[k] is None and pair.keys not in self._pending:
                known = self._routes.get(pair.keys)
                if known is None or not known.frozen:
                    self._pending[pair.keys] = self._route(pair, known)
                    groups[k] = self._pending[pair.keys].group
            elif groups[k] is None:
                groups[k] = self._pending[pair.keys].group
        owners: list[Optimizer | None] = [None] * len(pairs)
        for i, child in enumerate(self.optimizers):
            mine = [j for j, group in enumerate(groups) if group == i]
            if mine:
                for j, owner in zip(mine, child.assign_owners([pairs[j] for j in mine])):
                    owners[j] = owner
        for pair, owner in zip(pairs, owners):  # guards, for new paths only
            decided = self._pending.get(pair.keys)
            if owner is not None and decided is not None and not decided.frozen:
                self._pending[pair.keys] = replace(decided, notes=self._guard(pair, owner))
        return owners

    def group_of(self, keys: tuple) -> int | None:
        """The index of the optimizer that takes ``keys`` in the step under way (decided now
        or before), or ``None`` (frozen, or not decided)."""
        route = self._routes.get(keys)
        if route is None:
            route = self._pending.get(keys)
        return None if route is None or route.frozen else route.group

    def commit(self, backend: Backend | None) -> None:
        for keys, route in self._pending.items():
            self._routes[keys] = route
        if self._pending:
            self.book.version += 1
            self._warn_dead_filters()
        self._pending = {}
        for child in self.optimizers:
            child.commit(backend)

    def _dead_filters(self):
        """Indices of the filters that no routed parameter went through."""
        used = {route.group for route in self._routes.values()}
        return [i for i in range(len(self.filters) - 1) if i not in used]

    def plan_warnings(self) -> list:
        return [f"{self._filter_name(i)} matches no parameter" for i in self._dead_filters()]

    def _warn_dead_filters(self):
        for i in self._dead_filters():
            if ("dead", i) not in self._warned:
                self._warned.add(("dead", i))
                warn(
                    f"MultiOptimizer: {self._filter_name(i)} matches no parameter, so {self.names[i]} updates nothing",
                    RoutingWarning,
                )

    def stateful(self) -> list:
        return [o for child in self.optimizers for o in child.stateful()]

    _SNAPSHOT = ("book", "_compiled", "_routes", "_warned", "changes")

    def snapshot(self) -> Callable[[], None]:
        restores = [super().snapshot()] + [child.snapshot() for child in self.optimizers]

        def restore():
            for undo in restores:
                undo()

        return restore

    def routers(self, position: tuple = ()) -> list:
        found = [(position, self)]
        for i, child in enumerate(self.optimizers):
            found.extend(child.routers(position + (i,)))
        return found

    def note_change(self, what: str) -> None:
        self.changes.append(f"step {self._step_number()}: {what}")

    def named_stateful(self, name: str | None = None, position: tuple = ()) -> list:
        found = []
        for i, (child_name, child) in enumerate(zip(self.names, self.optimizers)):
            full = child_name if name is None else f"{name}/{child_name}"
            found.extend(child.named_stateful(full, position + (i,)))
        return found

    def placement(self, keys: tuple) -> Placement | None:
        route = self._routes.get(keys)
        if route is None:
            return None
        if route.frozen or route.group is None:
            return Placement(keys, None, "frozen", (), (), route.shape, route.dtype)
        child = self.optimizers[route.group]
        inner = child.placement(keys)
        if inner is not None:  # a MultiOptimizer inside: its reason after ours
            return inner._replace(reason=f"{self._filter_name(route.group)} > {inner.reason}")
        return Placement(keys, child, route.reason, route.also, route.notes, route.shape, route.dtype)

    def routing_table(self) -> list:
        return [self.placement(keys) for keys in self._routes]

    def owner_of(self, keys: tuple) -> Optimizer | None:
        route = self._routes.get(keys)  # a frozen parameter keeps its owner, and its state
        return None if route is None or route.group is None else self.optimizers[route.group].owner_of(keys)

    def route(self, path: str | tuple) -> int | None:
        """The index of the optimizer that owns ``path`` (a dotted path or keys tuple), or
        ``None`` for a path not seen yet or frozen."""
        route = self._routes.get(self._keys_of(path))
        return None if route is None or route.frozen else route.group

    def routes(self) -> dict[tuple, Route]:
        """Every known path's :class:`Route` (keys -> record), in the order first seen. A copy:
        the records are immutable, so nothing read here changes the routing. Checkpoints save
        from it what the filters cannot redo (freezes, unfreezes, re-routes)."""
        return dict(self._routes)

    def restore_route(self, keys: tuple, route: Route) -> None:
        """Put ``route`` in place for the parameter at ``keys``, as a checkpoint restores a
        freeze, unfreeze or re-route. A parameter that changes group loses the state its old
        optimizer held for it, as ``reroute(..., state="reset")`` does."""
        known = self._routes.get(keys)
        if known is not None and known.group != route.group:
            owner = self.owner_of(keys)
            if owner is not None:
                engine.drop(owner, keys)
        self._routes[keys] = route
        self.book.version += 1

    def overlaps(self) -> dict[str, list[int]]:
        """``{path: [every filter index that accepts it]}`` for parameters accepted by more
        than one filter (the first still wins)."""
        return {
            dotted(k): [route.group, *route.also]
            for k, route in self._routes.items()
            if route.also and route.group is not None
        }

    # ------------------------------------------------------------------ changes during training
    def _keys_of(self, path):
        if isinstance(path, tuple):
            return path
        return next((keys for keys in self._routes if dotted(keys) == path), None)

    def _select(self, which):
        """Known parameters (routed or frozen) selected by a path, a list of paths, or a filter."""
        known = self._routes
        if isinstance(which, (str, tuple)):
            which = [which]
        if callable(which):
            fn = as_filter(which)
            return [k for k in known if fn(dotted(k), _Shape(known[k].shape))]
        selected = []
        for path in which:
            keys = self._keys_of(path)
            if keys is None:
                raise KeyError(f"MultiOptimizer: no known parameter {path!r} (take a step or call init first)")
            selected.append(keys)
        return selected

    def _step_number(self):
        return int(as_float(self.step))

    def freeze(self, which: str | tuple | Sequence | Filter) -> list[str]:
        """Stop updating the selected parameters (a path, paths, or a filter). Their state is
        kept, so :meth:`unfreeze` resumes where they stopped."""
        selected = [k for k in self._select(which) if not self._routes[k].frozen]
        for keys in selected:
            self._routes[keys] = replace(self._routes[keys], frozen=True)
        self.book.version += 1
        if selected:
            self.changes.append(f"step {self._step_number()}: froze {', '.join(dotted(k) for k in selected)}")
        return [dotted(k) for k in selected]

    def unfreeze(self, which: str | tuple | Sequence | Filter) -> list[str]:
        """Update the selected frozen parameters again (routed by the filters if they never
        had a route)."""
        selected = [k for k in self._select(which) if self._routes[k].frozen]
        for keys in selected:
            self._routes[keys] = replace(self._routes[keys], frozen=False, unfrozen=True)
        self.book.version += 1
        if selected:
            self.changes.append(f"step {self._step_number()}: unfroze {', '.join(dotted(k) for k in selected)}")
        return [dotted(k) for k in selected]

    def reroute(self, which: str | tuple | Sequence | Filter, to: int | str, state: str = "reset") -> list[str]:
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
        self.book.version += 1
        for keys in self._select(which):
            route = self._routes[keys]
            old = route.group
            if old == target:
                continue
            owner = self.optimizers[old].owner_of(keys) if old is not None else None
            slots = engine.drop(owner, keys) if owner is not None else {}
            self._routes[keys] = replace(route, group=target, reason="rerouted", also=(), notes=())
            new_owner = self.optimizers[target]
            kept = {}
            if state == "carry" and slots and owner is not None and new_owner.stateful() == [new_owner]:
                kept = _carry(owner, new_owner, slots)
                new_owner.book.carried[keys] = kept
            moved.append(keys)
            carried = f", carrying {', '.join(sorted(kept))}" if kept else ", state reset"
            self.changes.append(
                f"step {self._step_number()}: rerouted {dotted(keys)} from "
                f"{self.names[old] if old is not None else 'nowhere'} to {self.names[target]}{carried}"
            )
        return [dotted(k) for k in moved]

    @property
    def lr_multiplier(self) -> float | None:
        """The value of ``lr_schedule`` that the next step uses (``None`` without one)."""
        return None if self.lr_schedule is None else as_float(self.lr_schedule(self.step))

    # ------------------------------------------------------------------ whole-model operations
    def prepare_step(self, pairs: list[Pair], owners: list) -> tuple:
        groups = [self.group_of(pair.keys) for pair in pairs]  # routed pairs: never None
        return whole_model.prepare(self, pairs, owners, groups)  # type: ignore[arg-type]

    def whole_model_state(self) -> dict:
        return {k: v for k, v in self._state.items() if k != "states"}

    def scalar_state(self) -> dict:
        return {"states": [child.scalar_state() for child in self.optimizers]}

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
    def state(self, state: dict) -> None:
        self.check_state(state)
        for child, child_state in zip(self.optimizers, state["states"]):
            child.state = child_state
        state["states"] = list(state["states"])
        self._state = state
        self.book.version += 1

    def check_state(self, state: dict) -> None:
        """Every child's state checked (see ``Optimizer.check_state``) before any is set."""
        if not isinstance(state, dict) or "states" not in state:
            raise ValueError("MultiOptimizer.state must be a dict {'states': [one state per optimizer]}")
        states = state["states"]
        if not isinstance(states, (list, tuple)) or len(states) != len(self.optimizers):
            count = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
            raise ValueError(f"MultiOptimizer has {len(self.optimizers)} optimizers but the state holds {count} states")
        for i, (child, child_state) in enumerate(zip(self.optimizers, states)):  # every child checked first
            try:
                child.check_state(child_state)
            except (TypeError, ValueError) as error:
                raise type(error)(f"MultiOptimizer.state: states[{i}]: {error}") from error

    @property
    def step(self) -> Array:
        """The number of steps taken (every optimizer counts every step it takes)."""
        return self.optimizers[0].step

    @property
    def learning_rate(self) -> list:
        """One learning rate per optimizer (``None`` for one without)."""
        return [getattr(o, "learning_rate", None) for o in self.optimizers]

    @learning_rate.setter  # type: ignore[override]  # one per optimizer
    def learning_rate(self, values: Sequence) -> None:
        if not isinstance(values, (list, tuple)):
            raise TypeError(
                f"MultiOptimizer has {len(self.optimizers)} learning rates, one per optimizer; set them "
                "all with a list (e.g. multi.learning_rate = [0.02, 3e-4]) or one with "
                "multi.optimizers[i].learning_rate = value"
            )
        if len(values) != len(self.optimizers):
            raise ValueError(
                f"MultiOptimizer has {len(self.optimizers)} optimizers but got {len(values)} learning rates"
            )
        from treeopt.values import hyper

        for i, (child, value) in enumerate(zip(self.optimizers, values)):  # all checked before any is set
            if value is not None:
                if not hasattr(child, "learning_rate") or isinstance(child, MultiOptimizer):
                    raise TypeError(f"MultiOptimizer: optimizers[{i}] ({self.names[i]}) takes no single learning rate")
                hyper(value, f"MultiOptimizer learning_rate[{i}] ({self.names[i]})")
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


def _is_box(node):
    """A leaf that is not a container: flax's boxes (``LogicallyPartitioned``) included."""
    return not is_container(node)


def _truth(value):
    """A filter's answer as a bool: a Python or NumPy bool, or a one-element array."""
    if isinstance(value, bool):
        return value
    shape = tuple(getattr(value, "shape", ()))
    if math.prod(shape) != 1:
        raise TypeError(
            f"a filter must return a bool, got {type(value).__name__} of shape {getattr(value, 'shape', '?')}"
        )
    return bool(value)


@dataclass(frozen=True)
class _Leaf:
    """A known path, as routing sees a parameter when none is at hand."""

    keys: tuple
    path: str
    param: _Shape
    backend: None = None


class _Shape:
    """Stands in for a parameter when a filter selects known paths by name and shape."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(shape)
        self.ndim = len(self.shape)
