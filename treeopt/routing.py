"""Routing: which group (an optimizer with state) updates each parameter, and why.

Every optimizer has a router. A single optimizer's is :class:`Direct`: every parameter goes
to the optimizer itself. A ``MultiOptimizer``'s is :class:`Router`: each parameter goes to
the first child whose filter accepts it (the last child takes the rest), and on through that
child's own router.

A route is decided once, the first time its path is seen, from the parameter (not the
gradient), and kept as one :class:`Route` record: shape and dtype, the child, the reason,
guard notes, whether it is frozen, and per-parameter options for the rule. A step decides
the routes of new paths first (:meth:`Router.assign`, pending), and records them only when
it commits (:meth:`Router.commit`): a step that fails its checks leaves no route behind.
Changes during training (freeze, unfreeze, reroute) are logged in ``changes``.

What a parameter is (an embedding, a norm, a hidden matrix...) is read by the filters
(:mod:`treeopt.filters`) from the kinds an integration declares (:meth:`Router.declare_kinds`),
the whole tree being routed, the names and last the shape; a route that only the number of
dimensions decided is reported once through ``guards``. Kinds learned before the first step
(a trace of the forward pass, a model given whole) revise the routes already decided.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

from treeopt._trees import dotted
from treeopt.backends import as_float
from treeopt.errors import TreeoptError, describe, warn
from treeopt.filters import EXPERTS, IN_OUT, as_filter, module_kinds, normalise_kinds, routing_tree
from treeopt.rules.base import Rule
from treeopt.state import SlotStore, next_version
from treeopt.types import Array, Filter, Keys, Options, Shape

__all__ = ["Direct", "Member", "Route", "Router", "RoutingError", "RoutingWarning", "Target"]

#: what ``on_unmatched`` and ``guards`` accept
CHOICES = {"on_unmatched": ("fallback", "warn", "error"), "guards": ("warn", "error", "off")}


class RoutingError(TreeoptError, ValueError):
    """A parameter cannot be routed: a filter failed, or a check set to ``"error"``."""


class RoutingWarning(UserWarning):
    """A routing check set to ``"warn"`` found something."""


class Routed(Protocol):
    """A group as routing sees it: an optimizer with state."""

    rule: Rule | None
    store: SlotStore

    def init_single(self, parameter: Array, state: dict[str, Array]) -> None: ...

    def unsuited(self, path: str, parameter: Array) -> str | None: ...


class Parameter(Protocol):
    """A parameter being routed (the engine's pair)."""

    keys: Keys
    param: Array

    @property
    def path(self) -> str: ...

    @property
    def shape(self) -> Shape: ...

    @property
    def dtype(self) -> str: ...


@dataclass(frozen=True)
class Route:
    """Where one parameter path goes and why: one record per path, replaced (never changed in
    place) when something changes."""

    shape: tuple
    dtype: str
    #: index of its child; ``None`` when it was frozen before it was ever routed
    group: int | None = None
    #: why it goes there: ``"filters[0] (name)"``, ``"fallback"``, ``"rerouted"``, ``"all parameters"``
    reason: str = ""
    #: other filters that accept it (the first one won)
    also: tuple = ()
    #: the guard findings of its optimizer
    notes: tuple = ()
    frozen: bool = False
    #: unfrozen by hand: the ``frozen`` filter no longer applies to it
    unfrozen: bool = False
    #: options its rule takes for this parameter on top of the group's coefficients (e.g.
    #: Muon's ``layout``), as ``(name, value)`` pairs
    options: Options = ()


class Target(NamedTuple):
    """Where a step sends one parameter: the group, and the rule's options for it."""

    group: Any  # a group (treeopt.engine.Group)
    options: Options = ()


class Member(NamedTuple):
    """One group of an optimizer: its name (``"Muon"``, ``"hidden/Muon"``), its position among
    nested ``MultiOptimizer`` children, and the optimizer holding the state."""

    name: str
    position: tuple[int, ...]
    group: Any  # a group (treeopt.engine.Group)


#: how a declared kind has the rule view the weight (a rule that takes no such option ignores
#: it): Hugging Face's ``Conv1D`` stores ``(in, out)``; a stack of experts ``(E, out, in)`` is
#: one matrix per expert
VIEWS: dict[str, dict[str, Any]] = {IN_OUT: {"layout": "in_out"}, EXPERTS: {"batch_axes": 1}}


def views(kinds: Mapping[str, frozenset[str]]) -> dict[str, dict[str, Any]]:
    """``{path: options}`` that the kinds of each path imply (see :data:`VIEWS`)."""
    found: dict[str, dict[str, Any]] = {}
    for path, names in kinds.items():
        options = {key: value for name in sorted(names & VIEWS.keys()) for key, value in VIEWS[name].items()}
        if options:
            found[path] = options
    return found


def _options(declared: Mapping[str, Any] | None, rule: Rule | None) -> Options:
    """The declared options that are hyper-parameters of ``rule``, as sorted pairs."""
    if not declared or rule is None:
        return ()
    taken = rule.hyperparameters
    return tuple(sorted((k, v) for k, v in declared.items() if k in taken))


def _check_options(options: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    checked = {}
    for path, values in dict(options).items():
        if not isinstance(path, str) or not isinstance(values, Mapping) or not all(isinstance(k, str) for k in values):
            raise TypeError(f"options map a dotted path to {{option: value}}, got {path!r}: {values!r}")
        checked[path] = dict(values)
    return checked


class Direct:
    """The router of an optimizer that takes every parameter given to it."""

    def __init__(self, group: Routed) -> None:
        self.group = group
        self.declared: dict[str, dict[str, Any]] = {}  # path -> options for the rule
        self.viewed: dict[str, dict[str, Any]] = {}  # path -> options its kinds imply (VIEWS)
        self.version = next_version()

    # ------------------------------------------------------------------ what the engine drives
    def groups(self, name: str | None = None, position: tuple[int, ...] = ()) -> list[Member]:
        return [Member(name or type(self.group).__name__, position, self.group)]

    def assign(self, pairs: Sequence[Parameter]) -> list[Target | None]:
        if not self.declared and not self.viewed:
            return [Target(self.group)] * len(pairs)
        rule = self.group.rule
        return [Target(self.group, _options(self.wanted(pair.path), rule)) for pair in pairs]

    def wanted(self, path: str) -> dict[str, Any]:
        """The options declared for ``path``, over those its kinds imply."""
        return {**self.viewed.get(path, {}), **self.declared.get(path, {})}

    def commit(self) -> None:
        """Nothing to record: every parameter goes to the group."""

    def snapshot(self) -> Callable[[], None]:
        declared, viewed = dict(self.declared), dict(self.viewed)

        def restore() -> None:
            self.declared, self.viewed = dict(declared), dict(viewed)
            self.version = next_version()

        return restore

    # ------------------------------------------------------------------ what readers see
    def declare_options(self, options: Mapping[str, Mapping[str, Any]]) -> None:
        """Options for the rule by path (``{"h.0.attn.c_attn.weight": {"layout": "in_out"}}``),
        from the next step on; options that are not hyper-parameters of the rule are ignored."""
        checked = _check_options(options)
        before = {path: self.wanted(path) for path in checked}
        self.declared = {**self.declared, **checked}
        self._remake(path for path, wanted in before.items() if self.wanted(path) != wanted)
        self.version = next_version()

    def declare_kinds(self, kinds: Mapping[str, str | Iterable[str]], *, replace: bool = False) -> None:
        """Only the views kinds imply matter here (:data:`VIEWS`): an optimizer that does not
        route has no other use for them."""
        normalised = normalise_kinds(kinds)
        found = views(normalised)
        viewed = dict(self.viewed) if not replace else {p: v for p, v in self.viewed.items() if p not in normalised}
        for path, options in found.items():
            viewed[path] = options if replace else {**viewed.get(path, {}), **options}
        if viewed != self.viewed:
            before = {path: self.wanted(path) for path in set(viewed) | set(self.viewed)}
            self.viewed = viewed
            self._remake(path for path, wanted in before.items() if self.wanted(path) != wanted)
            self.version = next_version()

    def _remake(self, paths: Iterable[str]) -> None:
        """Slots made before any step for options that changed are made again for the new
        ones at the next step."""
        changed = set(paths)
        store = self.group.store
        _remake([(self.group, keys) for keys in list(store.parameters) if dotted(keys) in changed], store.started)

    def learn(self, model: object) -> None:
        """Kinds of a model given whole: an optimizer that does not route has no use for them."""

    def owner(self, keys: Keys) -> Routed | None:
        return self.group

    def entry(self, keys: Keys) -> Route | None:
        """A route this router decided itself (none: there is no choice to record)."""
        return None

    def table(self) -> list[tuple[Keys, Route, Routed | None]]:
        """``(keys, route, group)`` of every parameter with state, in the order first seen."""
        rule = self.group.rule
        return [
            (
                keys,
                Route(shape, dtype, 0, "all parameters", options=_options(self.wanted(dotted(keys)), rule)),
                self.group,
            )
            for keys, (shape, dtype) in self.group.store.parameters.items()
        ]

    def routers(self, position: tuple[int, ...] = ()) -> list[tuple[tuple[int, ...], Router]]:
        return []

    @property
    def changes(self) -> list[str]:
        return []

    def note(self, what: str) -> None:
        """A single optimizer keeps no log of changes."""

    def warnings(self) -> list[str]:
        return []


def _accept_all(path: str, weight: Array) -> bool:
    return True


class Router:
    """Routing over children, each a router (a single optimizer's :class:`Direct`, or a
    nested ``MultiOptimizer``'s ``Router``); see ``MultiOptimizer`` for the options."""

    def __init__(
        self,
        children: Sequence[Direct | Router],
        filters: Sequence[Filter],
        names: Sequence[str],
        frozen: Filter | None = None,
        on_unmatched: str = "fallback",
        guards: str = "warn",
    ) -> None:
        self.children = list(children)
        self.filters = list(filters) + [_accept_all]
        self.names = list(names)
        self.frozen = None if frozen is None else as_filter(frozen)
        self.on_unmatched, self.guards = on_unmatched, guards
        self._routes: dict[Keys, Route] = {}  # keys -> its Route, in the order first seen
        self._pending: dict[Keys, Route] = {}  # keys -> the Route decided by a step not committed yet
        self._warned: set = set()
        self.changes: list[str] = []  # freezes, unfreezes and re-routes, in order
        self.kinds: dict[str, frozenset[str]] = {}  # path -> kinds declared by an integration
        self.declared: dict[str, dict[str, Any]] = {}  # path -> options for the rule
        self.viewed: dict[str, dict[str, Any]] = {}  # path -> options its kinds imply (VIEWS)
        self._learned: weakref.ref | None = None  # the last model whose kinds were declared (see learn)
        self._version = next_version()

    @property
    def version(self) -> tuple:
        """Changes with any route, here or below (a compiled step is planned on them)."""
        return (self._version, *(child.version for child in self.children))

    # ------------------------------------------------------------------ what the engine drives
    def groups(self, name: str | None = None, position: tuple[int, ...] = ()) -> list[Member]:
        found = []
        for i, (child_name, child) in enumerate(zip(self.names, self.children)):
            found.extend(child.groups(child_name if name is None else f"{name}/{child_name}", position + (i,)))
        return found

    def assign(self, pairs: Sequence[Parameter]) -> list[Target | None]:
        """The target of each pair (``None``: frozen). Routes of new paths are decided now and
        wait for :meth:`commit`; known paths keep theirs."""
        new = any(pair.keys not in self._routes for pair in pairs)
        # filters of new routes may read the whole tree (the vocabulary-wide output layer, an
        # MoE layer's router beside its experts)
        tree = routing_tree({pair.path: pair.shape for pair in pairs}) if new else contextlib.nullcontext()
        with module_kinds(self.kinds) if self.kinds else contextlib.nullcontext(), tree:
            return self._assign(pairs)

    def _assign(self, pairs: Sequence[Parameter]) -> list[Target | None]:
        self._pending = {}
        indices = [self._index(pair.keys) for pair in pairs]
        for k, pair in enumerate(pairs):
            if indices[k] is not None:
                continue
            decided = self._pending.get(pair.keys)
            if decided is None:
                known = self._routes.get(pair.keys)
                if known is not None and known.frozen:
                    continue
                decided = self._pending[pair.keys] = self._route(pair, known)
            indices[k] = decided.group
        targets: list[Target | None] = [None] * len(pairs)
        for i, child in enumerate(self.children):
            mine = [j for j, index in enumerate(indices) if index == i]
            if mine:
                for j, target in zip(mine, child.assign([pairs[j] for j in mine])):
                    targets[j] = target
        for k, (pair, target) in enumerate(zip(pairs, targets)):
            decided = self._pending.get(pair.keys)
            if target is not None and decided is not None and not decided.frozen:  # new paths only
                group = target.group
                options = _options(self.wanted(pair.path), group.rule)
                decided = self._pending[pair.keys] = replace(decided, notes=self._guard(pair, group), options=options)
            route = decided or self._routes.get(pair.keys)
            if target is not None and route is not None and route.options:
                targets[k] = Target(
                    target.group, tuple(sorted({**dict(target.options), **dict(route.options)}.items()))
                )
        return targets

    def _index(self, keys: Keys) -> int | None:
        """The child that takes ``keys`` in the step under way (decided now or before), or
        ``None`` (frozen, or not decided)."""
        route = self._routes.get(keys)
        if route is None:
            route = self._pending.get(keys)
        return None if route is None or route.frozen else route.group

    def commit(self) -> None:
        """Record the routes decided by the last :meth:`assign`."""
        if self._pending:
            self._routes.update(self._pending)
            self._version = next_version()
            self._warn_dead_filters()
        self._pending = {}
        for child in self.children:
            child.commit()

    def snapshot(self) -> Callable[[], None]:
        saved = (dict(self._routes), set(self._warned), list(self.changes), dict(self.declared), dict(self.viewed))
        undo = [child.snapshot() for child in self.children]

        def restore() -> None:
            routes, warned, changes, declared, viewed = saved
            self._routes, self._warned, self.changes, self.declared, self.viewed = (
                dict(routes),
                set(warned),
                list(changes),
                dict(declared),
                dict(viewed),
            )
            self._pending = {}
            self._version = next_version()
            for child in undo:
                child()

        return restore

    # ------------------------------------------------------------------ deciding a route
    def filter_name(self, i: int) -> str:
        if i == len(self.filters) - 1:
            return "fallback"
        fn = self.filters[i]
        return f"filters[{i}] ({getattr(fn, 'name', None) or getattr(fn, '__name__', type(fn).__name__)})"

    def _route(self, pair: Parameter, known: Route | None) -> Route:
        """A new :class:`Route` for ``pair``: frozen, or the first accepting filter (and every
        other filter that accepts too)."""
        shape, dtype = pair.shape, pair.dtype
        unfrozen = known is not None and known.unfrozen
        if self.frozen is not None and not unfrozen and self.frozen(pair.path, pair.param):
            return Route(shape, dtype, frozen=True)
        chosen, also = None, []
        for i, fn in enumerate(self.filters[:-1]):
            try:
                accepted = _truth(fn(pair.path, pair.param))
            except Exception as error:
                if chosen is not None:
                    continue  # only the overlap report needed it
                raise RoutingError(
                    f"MultiOptimizer: {self.filter_name(i)} raised {type(error).__name__}: {error} "
                    f"on {describe(pair.path)}"
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
                    f"{describe(pair.path)} is accepted by no filter; it goes to the "
                    f"fallback optimizer {self.names[chosen]}",
                    ("unmatched", pair.keys),
                )
        reason = self._explain(chosen, pair.path, pair.param)
        return Route(shape, dtype, chosen, reason, tuple(also), unfrozen=unfrozen)

    def _explain(self, chosen: int, path: str, weight: Any) -> str:
        """The route's reason: the filter that took it, and what the parameter is when a filter
        can tell (:func:`treeopt.filters.role`). A parameter whose route only its number of
        dimensions decided is reported, once, through ``guards``."""
        reason = self.filter_name(chosen)
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

    def _guard(self, pair: Parameter, group: Routed) -> tuple[str, ...]:
        reason = group.unsuited(pair.path, pair.param)
        if reason and self.guards != "off":
            self._report(self.guards, f"{describe(pair.path)}: {reason}", ("guard", pair.keys))
        return (reason,) if reason else ()

    def _report(self, how: str, message: str, key: Any) -> None:
        if how == "error":
            raise RoutingError(f"MultiOptimizer: {message}")
        if key not in self._warned:
            self._warned.add(key)
            warn(message, RoutingWarning)

    def _dead_filters(self) -> list[int]:
        """Indices of the filters that no routed parameter went through."""
        used = {route.group for route in self._routes.values()}
        return [i for i in range(len(self.filters) - 1) if i not in used]

    def _warn_dead_filters(self) -> None:
        for i in self._dead_filters():
            if ("dead", i) not in self._warned:
                self._warned.add(("dead", i))
                warn(
                    f"MultiOptimizer: {self.filter_name(i)} matches no parameter, so {self.names[i]} updates nothing",
                    RoutingWarning,
                )

    def warnings(self) -> list[str]:
        """What a plan should point out: filters that match nothing."""
        return [f"{self.filter_name(i)} matches no parameter" for i in self._dead_filters()]

    def declare_kinds(self, kinds: Mapping[str, str | Iterable[str]], *, replace: bool = False) -> None:
        """Say what some parameters are, by path: ``{"tok.weight": "embedding"}`` (a kind or
        several). Filters see it through :func:`treeopt.filters.kinds_of` (``is_embedding``,
        ``is_head``, ``is_norm``, ``kind(...)``), and so do optimizers' routing guards.
        Framework integrations call it. Kinds add to those declared before, unless
        ``replace`` (a trace of the forward pass replacing guesses).

        Parameters routed before are routed again with what is now known: before the first
        step they move (the plan's reason starts with ``revised:``); after it a warning says
        which would move and how (``reroute``)."""
        changed = set()
        for path, values in normalise_kinds(kinds).items():
            merged = values if replace else self.kinds.get(path, frozenset()) | values
            if merged != self.kinds.get(path):
                self.kinds[path] = merged
                changed.add(path)
        if not changed:
            return
        found = views({path: self.kinds[path] for path in changed})
        self.viewed = {**{p: v for p, v in self.viewed.items() if p not in changed}, **found}
        if self._routes:
            self._revise(changed)
            self._refresh_options(changed)
        self._version = next_version()

    def _revise(self, paths: set[str]) -> None:
        """Route again, with the kinds now known, the parameters at ``paths`` that the filters
        routed before (a route decided from names is revised when an integration learns what
        the layer is). Before the first step the parameter moves, its reason says why; after
        it, the state it has would be lost, so a warning says what to do instead."""
        shapes = {dotted(keys): route.shape for keys, route in self._routes.items()}
        moved = []
        started = None  # read only if a route would move
        with module_kinds(self.kinds), routing_tree(shapes):
            for keys, known in list(self._routes.items()):
                path = dotted(keys)
                if path not in paths or known.frozen or known.group is None or known.reason == "rerouted":
                    continue
                try:
                    fresh = self._route(_Known(keys, known), known)
                except RoutingError:
                    continue  # a filter that needs the array itself: the route stays as it was
                if fresh.group == known.group:
                    self._routes[keys] = replace(known, reason=fresh.reason)
                    continue
                if fresh.group is None:  # the frozen filter: freezing is for freeze(), not for kinds
                    continue
                old, new = self.names[known.group], self.names[fresh.group]
                if started is None:
                    started = self._started()
                if not started:
                    owner = self.owner(keys)
                    if owner is not None:
                        owner.store.drop(keys)
                    self._routes[keys] = replace(fresh, reason=f"revised: {fresh.reason}", notes=known.notes)
                    moved.append(f"{path} from {old} to {new}")
                else:
                    self._report(
                        "warn",
                        f"{describe(path)} was routed to {old}; what is now known of it ({fresh.reason}) routes "
                        f"it to {new}. Steps were taken (or a compiled function is being traced), so it stays: "
                        f"reroute({path!r}, {new!r}) moves it",
                        ("revise", keys),
                    )
        self._version = next_version()
        if moved:
            self.changes.append(f"step 0: revised {', '.join(moved)} (module kinds learned)")

    def _started(self) -> bool:
        """Whether steps were taken (as if they were while a compiled function is traced, so
        that no route moves then)."""
        return self.groups()[0].group.store.started()

    def learn(self, model: Any) -> None:
        """Declare the kinds of a framework's model given whole (an ``mlx.nn.Module``, as
        ``mlx.optimizers`` takes it), once per model object."""
        if self._learned is not None and self._learned() is model:
            return
        if any(c.__module__.startswith("mlx.nn") for c in type(model).__mro__):
            # MLX only when an MLX model is given
            from treeopt import mlx as treeopt_mlx

            self.declare_kinds(treeopt_mlx.module_kinds(model))
            self._learned = weakref.ref(model)

    def declare_options(self, options: Mapping[str, Mapping[str, Any]]) -> None:
        """Options for the rule by path (``{"h.0.attn.c_attn.weight": {"layout": "in_out"}}``):
        applied to the known routes now and to new ones when they are routed; options the
        rule of the parameter's group does not take are ignored."""
        checked = _check_options(options)
        self.declared = {**self.declared, **checked}
        self._refresh_options(set(checked))
        self._version = next_version()

    def wanted(self, path: str) -> dict[str, Any]:
        """The options declared for ``path``, over those its kinds imply (:data:`VIEWS`)."""
        return {**self.viewed.get(path, {}), **self.declared.get(path, {})}

    def _refresh_options(self, paths: set[str]) -> None:
        """The known routes at ``paths`` take the options now wanted for them; slots made for
        the old options before any step are made again for the new ones at the next step."""
        changed = []
        for keys, route in list(self._routes.items()):
            path = dotted(keys)
            owner = self.owner(keys)
            if path in paths and owner is not None:
                options = _options(self.wanted(path), owner.rule)
                if options != route.options:
                    changed.append((owner, keys))
                self._routes[keys] = replace(route, options=options)
        _remake(changed, self._started)

    # ------------------------------------------------------------------ what readers see
    def owner(self, keys: Keys) -> Routed | None:
        """The group that owns the parameter at ``keys`` (a frozen one keeps its owner, and
        its state); ``None`` when it has none."""
        route = self._routes.get(keys)
        return None if route is None or route.group is None else self.children[route.group].owner(keys)

    def index(self, keys: Keys) -> int | None:
        """The child that updates ``keys``, or ``None`` (not seen yet, or frozen)."""
        route = self._routes.get(keys)
        return None if route is None or route.frozen else route.group

    def entry(self, keys: Keys) -> Route | None:
        """The route of ``keys`` as far as it is decided here and below (the reasons joined
        with ``>``), or ``None`` for a path not seen."""
        route = self._routes.get(keys)
        if route is None:
            return None
        if route.frozen or route.group is None:
            return Route(route.shape, route.dtype, reason="frozen", frozen=True, unfrozen=route.unfrozen)
        inner = self.children[route.group].entry(keys)
        if inner is not None:  # a MultiOptimizer inside: its reason after ours
            return replace(inner, reason=f"{self.filter_name(route.group)} > {inner.reason}")
        return route

    def table(self) -> list[tuple[Keys, Route, Routed | None]]:
        """``(keys, route, group)`` of every path known, in the order first seen (``None``:
        frozen)."""
        rows = []
        for keys in self._routes:
            route = self.entry(keys)
            assert route is not None  # a known path
            rows.append((keys, route, None if route.frozen else self.owner(keys)))
        return rows

    def routes(self) -> dict[Keys, Route]:
        """Every known path's :class:`Route` (keys -> record), in the order first seen. A copy:
        the records are immutable, so nothing read here changes the routing."""
        return dict(self._routes)

    def restore(self, keys: Keys, route: Route) -> None:
        """Put ``route`` in place for the parameter at ``keys``, as a checkpoint restores a
        freeze, unfreeze or re-route. A parameter that changes child loses the state its old
        group held for it, as ``reroute(..., state="reset")`` does."""
        known = self._routes.get(keys)
        if known is not None and known.group != route.group:
            owner = self.owner(keys)
            if owner is not None:
                owner.store.drop(keys)
        self._routes[keys] = route
        self._version = next_version()

    def routers(self, position: tuple[int, ...] = ()) -> list[tuple[tuple[int, ...], Router]]:
        """``(position, router)`` of this router and every router below it, outermost first."""
        found: list[tuple[tuple[int, ...], Router]] = [(position, self)]
        for i, child in enumerate(self.children):
            found.extend(child.routers(position + (i,)))
        return found

    def overlaps(self) -> dict[str, list[int]]:
        """``{path: [every filter index that accepts it]}`` for parameters accepted by more
        than one filter (the first still wins)."""
        return {
            dotted(k): [route.group, *route.also]
            for k, route in self._routes.items()
            if route.also and route.group is not None
        }

    # ------------------------------------------------------------------ changes during training
    def note(self, what: str) -> None:
        """Log a change made from outside (the torch adapter resetting a replaced parameter)."""
        self.changes.append(f"step {self._step()}: {what}")

    def _step(self) -> int:
        return int(as_float(self.groups()[0].group.store.tree["step"]))

    def keys_of(self, path: str | tuple) -> Keys | None:
        if isinstance(path, tuple):
            return path
        return next((keys for keys in self._routes if dotted(keys) == path), None)

    def _select(self, which: str | tuple | Sequence | Filter) -> list[Keys]:
        """Known parameters (routed or frozen) selected by a path, a list of paths, or a filter."""
        known = self._routes
        if isinstance(which, (str, tuple)):
            which = [which]
        if callable(which):
            fn = as_filter(which)
            return [k for k in known if fn(dotted(k), _Shape(known[k].shape))]
        selected = []
        for path in which:
            keys = self.keys_of(path)
            if keys is None:
                raise KeyError(f"MultiOptimizer: no known parameter {path!r} (take a step or call init first)")
            selected.append(keys)
        return selected

    def freeze(self, which: str | tuple | Sequence | Filter) -> list[str]:
        selected = [k for k in self._select(which) if not self._routes[k].frozen]
        for keys in selected:
            self._routes[keys] = replace(self._routes[keys], frozen=True)
        self._version = next_version()
        if selected:
            self.note(f"froze {', '.join(dotted(k) for k in selected)}")
        return [dotted(k) for k in selected]

    def unfreeze(self, which: str | tuple | Sequence | Filter) -> list[str]:
        selected = [k for k in self._select(which) if self._routes[k].frozen]
        for keys in selected:
            self._routes[keys] = replace(self._routes[keys], frozen=False, unfrozen=True)
        self._version = next_version()
        if selected:
            self.note(f"unfroze {', '.join(dotted(k) for k in selected)}")
        return [dotted(k) for k in selected]

    def reroute(self, which: str | tuple | Sequence | Filter, to: int | str, state: str = "reset") -> list[str]:
        if state not in ("reset", "carry"):
            raise ValueError(f"reroute: state must be 'reset' or 'carry', got {state!r}")
        target = self.names.index(to) if isinstance(to, str) and to in self.names else to
        if not isinstance(target, int) or not 0 <= target < len(self.children):
            raise IndexError(f"reroute: there is no optimizer {to!r} (names: {self.names})")
        moved = []
        self._version = next_version()
        destination = self.children[target]
        for keys in self._select(which):
            route = self._routes[keys]
            old = route.group
            if old == target:
                continue
            owner = self.children[old].owner(keys) if old is not None else None
            slots = owner.store.drop(keys) if owner is not None else {}
            self._routes[keys] = replace(route, group=target, reason="rerouted", also=(), notes=())
            kept: dict[str, Array] = {}
            if state == "carry" and slots and owner is not None and isinstance(destination, Direct):
                kept = _carry(owner.rule, destination.group.rule, slots)
                destination.group.store.carry(keys, kept)
            moved.append(keys)
            carried = f", carrying {', '.join(sorted(kept))}" if kept else ", state reset"
            self.note(
                f"rerouted {dotted(keys)} from {self.names[old] if old is not None else 'nowhere'} to "
                f"{self.names[target]}{carried}"
            )
        return [dotted(k) for k in moved]


def _remake(changed: Sequence[tuple[Routed, Keys]], started: Callable[[], bool]) -> None:
    """The state of parameters whose route's options changed (``(owner, keys)`` each): made
    for the old view, so before any step (zeros) it is dropped, to be made again for the new
    one; after steps it is kept, and the step refuses slots that no longer fit."""
    held = [(owner, keys) for owner, keys in changed if owner.store.slots(keys)]
    if held and not started():
        for owner, keys in held:
            owner.store.drop(keys)


def _carry(old: Rule | None, new: Rule | None, slots: dict[str, Array]) -> dict[str, Array]:
    """The slots of ``old``'s rule that mean the same in ``new``'s (e.g. AdamW's m and v into
    Adam), under ``new``'s slot names. A slot carries only to a slot of the same meaning:
    Adam's second moment ``v`` never becomes SGD's momentum buffer ``v``."""
    old_meanings = (old.slot_meanings or {}) if old is not None else {}
    new_meanings = (new.slot_meanings or {}) if new is not None else {}
    by_meaning = {old_meanings[name]: value for name, value in slots.items() if name in old_meanings}
    return {name: by_meaning[meaning] for name, meaning in new_meanings.items() if meaning in by_meaning}


def _truth(value: Any) -> bool:
    """A filter's answer as a bool: a Python or NumPy bool, or a one-element array."""
    if isinstance(value, bool):
        return value
    shape = tuple(getattr(value, "shape", ()))
    if math.prod(shape) != 1:
        raise TypeError(
            f"a filter must return a bool, got {type(value).__name__} of shape {getattr(value, 'shape', '?')}"
        )
    return bool(value)


class _Shape:
    """Stands in for a parameter when a filter selects known paths by name and shape."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(shape)
        self.ndim = len(self.shape)


class _Known:
    """A known path, as routing sees a parameter when none is at hand (a route revised)."""

    def __init__(self, keys: Keys, route: Route) -> None:
        self.keys, self.param = keys, _Shape(route.shape)
        self.path, self.shape, self.dtype = dotted(keys), tuple(route.shape), route.dtype
