"""The step engine: how one step checks, commits and runs, whatever the optimizer.

A step goes in three phases, so that bad input never leaves the optimizer half-changed:

1. *Check*: walk the gradients with the parameters and check every pair (a parameter
   exists, same library, shape and dtype) and every state slot it will use. The router
   decides the group of each new path (pending). Nothing is changed yet; any error names
   the parameter path.
2. *Commit*: the router records the new routes, the slots of new parameters are created,
   the schedules are evaluated and every group that steps counts the step.
3. *Run*: the pairs are grouped by (group, library, dtype, device, options), each bucket's
   coefficients are computed once, and the group's rule runs on every pair of the bucket.

The engine drives the parts below it and is never called back. It needs three things,
each described by a protocol here: a :class:`Router` (``groups``, ``assign``, ``commit``,
``snapshot``: :mod:`treeopt.routing`), the :class:`Group` s it routes to (an optimizer's
``store``, ``scalars``, ``runs_rule``, ``init_single``, ``apply_single``), and optionally a
:class:`StepHook` (``prepare``: whole-model work between the checks and the commit,
:mod:`treeopt.whole_model`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import FrameType
from typing import Any, NamedTuple, Protocol

from treeopt import _trees
from treeopt.backends import Backend, backend_of, numpy_backend
from treeopt.errors import MissingParameterError, ParameterError, describe
from treeopt.kernels import stacking
from treeopt.precision import Layout
from treeopt.routing import Member, Target
from treeopt.rules.base import Rule, rule_checked
from treeopt.scalars import Scalars
from treeopt.state import SlotStore, slot_problem
from treeopt.tree import is_container, items, rebuild
from treeopt.types import Array, Keys, Options, Shape, Tree

__all__ = [
    "Group",
    "Pair",
    "Router",
    "StepHook",
    "Taken",
    "coefficients",
    "collect",
    "initialize",
    "route",
    "run_one",
    "run_plain",
    "run_rule",
    "run_stored",
    "step",
    "with_results",
    "write_back",
]

_MISSING = object()


# ---------------------------------------------------------------------- what the engine drives
class Group(Protocol):
    """An optimizer with state, as the engine drives it."""

    store: SlotStore
    scalars: Scalars
    #: whether the engine runs ``scalars.rule`` itself (else it calls ``apply_single``)
    runs_rule: bool

    def init_single(self, parameter: Array, state: dict[str, Array]) -> None: ...

    def apply_single(self, gradient: Array, parameter: Array, state: dict[str, Array]) -> Array: ...


class Router(Protocol):
    """Who updates each parameter (:class:`treeopt.routing.Router` or ``Direct``)."""

    def groups(self) -> list[Member]: ...

    def assign(self, pairs: Sequence[Pair]) -> list[Target | None]: ...

    def commit(self) -> None: ...

    def snapshot(self) -> Callable[[], None]: ...


class Prepared(NamedTuple):
    """What a step hook leaves of a step: the pairs to update, the groups that step
    (``None``: every group) and what it records when the step commits."""

    pairs: list[Pair]
    stepping: list[Group] | None = None
    commit: Callable[[], None] | None = None


class StepHook(Protocol):
    """Whole-model work between the checks and the commit (:mod:`treeopt.whole_model`)."""

    def prepare(self, pairs: list[Pair]) -> Prepared: ...


class Pair:
    """One gradient and its parameter in one step: where they are, and what the step decides."""

    __slots__ = ("keys", "grad", "param", "backend", "group", "options", "slots", "result", "owned")
    keys: Keys
    grad: Array  # None: no step for this parameter
    param: Array
    #: the library of ``grad`` and ``param`` (``None`` only in a pair without a gradient, which never runs)
    backend: Backend
    #: the group that updates it, the rule's options for it, and its slots (``None`` until the
    #: step routes it; a routed pair's slots are a dict once the commit created them)
    group: Group
    options: Options
    slots: Any
    result: Array
    owned: bool

    def __init__(
        self, keys: Keys, grad: Array, param: Array, backend: Backend | None = None, owned: bool = True
    ) -> None:
        self.keys, self.grad, self.param, self.backend = keys, grad, param, backend  # type: ignore[assignment]
        self.owned = owned  # the param is the caller's own array (not made from a number)
        self.group = self.slots = None  # type: ignore[assignment]
        self.options = ()
        self.result = param

    @property
    def path(self) -> str:
        return _trees.dotted(self.keys)

    @property
    def shape(self) -> Shape:
        return tuple(self.backend.shape(self.param))

    @property
    def dtype(self) -> str:
        return self.backend.dtype_name(self.param)


class Taken(NamedTuple):
    """A step taken: the new tree, every pair, the pairs updated, the groups that stepped."""

    tree: Tree
    pairs: list[Pair]
    active: list[Pair]
    stepping: list[Group]


# ---------------------------------------------------------------------- the step
def step(router: Router, hook: StepHook | None, gradients: Tree, parameters: Tree, in_place: bool, name: str) -> Taken:
    """One step of the groups ``router`` routes to; ``name`` (the optimizer's) starts every
    error message."""
    # 1. check
    pairs = collect(gradients, parameters, name)
    groups: list[Group] = [member.group for member in router.groups()]
    active = [pair for pair in pairs if pair.grad is not None]
    backend = settle_backend(groups, active, name)
    new: dict[int, set[Keys]] = {}  # id(group) -> keys of the pairs whose slots it must (re)create
    routed = []
    for pair, target in zip(active, router.assign(active)):
        if target is None:  # frozen
            continue
        group = pair.group = target.group
        pair.options = target.options
        store = group.store
        pair.slots = store.slots(pair.keys)
        if pair.slots:  # every step: a parameter may have changed shape under its path, or its route's view
            store.check_slots(
                type(group).__name__, pair.keys, pair.param, pair.backend, pair.slots, group.runs_rule, pair.options
            )
        if not pair.slots or not store.checked:
            new.setdefault(id(group), set()).add(pair.keys)
        routed.append(pair)
    _check_rules(routed)
    if in_place:
        check_write_back(parameters, routed)
    check_depth(pairs)
    prepared = Prepared(routed) if hook is None else hook.prepare(routed)
    active = prepared.pairs
    stepping = groups if prepared.stepping is None else prepared.stepping
    due = [(group, group.scalars.due()) for group in stepping]  # may raise: before any write
    # 2. commit: only bookkeeping and new slots, undone if anything here fails
    undo = [router.snapshot()] + [group.store.snapshot() for group in groups]
    try:
        router.commit()
        for group in groups:
            group.store.settle(backend)
        updating = {(id(pair.group), pair.keys) for pair in active}  # a skipped pair gets no state yet
        for pair in active:  # the view of a route (its options) is what its slots were checked for
            pair.group.store.view(pair.keys, pair.options)
        for group in groups:
            keys = {k for k in new.get(id(group), ()) if (id(group), k) in updating}
            if keys:
                group.store.create(parameters, keys, group.init_single)
        for pair in active:
            if pair.keys in new.get(id(pair.group), ()):
                pair.slots = pair.group.store.slots(pair.keys)
        for group in groups:
            group.store.checked = True
        for group, values in due:
            group.scalars.advance(values)
        # 3. run: every input was checked above. User code (a custom apply_single) runs first,
        # into temporaries, and a failure there still undoes the commit; then everything is written.
        buckets = list(_buckets(active).values())
        custom = {id(b[0]): compute_custom(b[0].group, b) for b in buckets if not b[0].group.runs_rule}
    except BaseException:
        for restore in undo:
            restore()
        raise
    if prepared.commit is not None:
        prepared.commit()
    for bucket in buckets:
        if bucket[0].group.runs_rule:
            run_rule(bucket[0].group, bucket, in_place)
        else:
            write_custom(custom[id(bucket[0])], in_place)
    return Taken(with_results(gradients, iter(pairs)), pairs, active, stepping)


def route(
    router: Router,
    parameters: Tree,
    name: str,
    check: Callable[[list[Pair], list[Target | None]], None] | None = None,
) -> list[tuple[Pair, Target | None]]:
    """Decide and record the route of every parameter in ``parameters`` (a tree), creating no
    state; ``check(pairs, targets)`` may refuse the routes before they are recorded."""
    pairs = [pair for pair in collect(parameters, parameters, name, check_pairs=False) if pair.grad is not None]
    groups: list[Group] = [member.group for member in router.groups()]
    backend = settle_backend(groups, pairs, name)
    targets = router.assign(pairs)
    if check is not None:
        check(pairs, targets)
    router.commit()
    for group in groups:
        group.store.settle(backend)
    return list(zip(pairs, targets))


def initialize(router: Router, parameters: Tree, name: str) -> None:
    """Create the state of every parameter in ``parameters`` that has none yet (additive)."""
    new: dict[int, tuple[Group, dict[Keys, Options]]] = {}
    for pair, target in route(router, parameters, name):
        if target is not None:  # None: frozen
            new.setdefault(id(target.group), (target.group, {}))[1][pair.keys] = target.options
    for group, keys in new.values():
        group.store.create(parameters, keys, group.init_single, keys)
    for member in router.groups():
        member.group.store.checked = True


def settle_backend(groups: Iterable[Group], pairs: Iterable[Pair], name: str) -> Backend | None:
    """The one array library of these pairs and of the state; checked, not adopted."""
    expected = next((g.store.backend for g in groups if g.store.backend is not None), None)
    first = None
    for pair in pairs:
        if expected is None:
            expected, first = pair.backend, pair
        elif pair.backend is not expected:
            other = f"{describe(first.path)} is a" if first else "the optimizer state holds"
            raise ParameterError(
                f"{name}: {describe(pair.path)} is a {pair.backend.name} array, but "
                f"{other} {expected.name} array; one optimizer works on arrays of one library",
                pair.path,
            )
    return expected


def _check_rules(pairs: Iterable[Pair]) -> None:
    """Compute each rule's coefficients once before the commit, so that a rule whose
    coefficients do not fit its update fails before anything changes (checked once per rule)."""
    seen: set[int] = set()
    for pair in pairs:
        group = pair.group
        rule = group.scalars.rule
        if group.runs_rule and rule is not None and id(group) not in seen and not rule_checked(rule):
            seen.add(id(group))
            group.scalars.check_rule()


def write_back(model: Tree, new: Tree, pairs: list[Pair]) -> None:
    """Put the results that are not the caller's own arrays, written in place, into ``model``."""
    replaced = [pair for pair in pairs if pair.result is not pair.param or not pair.owned]
    if not replaced:
        return
    if not is_container(model) and hasattr(model, "update"):
        model.update(new)
        return
    for pair in replaced:
        if _trees.assign(model, pair.keys, pair.result) is not model:
            raise TypeError(
                f"cannot update {describe(pair.path)} inside a tuple at the root of the model; "
                "use apply_gradients and keep its result"
            )


def check_write_back(model: Tree, pairs: Iterable[Pair]) -> None:
    """An in-place step that must replace an array (immutable, read-only, made from a number)
    needs a container to put it in: refused before the step when the model is a tuple."""
    if type(model) is not tuple:
        return
    for pair in pairs:
        if len(pair.keys) == 1 and not (pair.owned and pair.backend.mutable and pair.backend.writable(pair.param)):
            raise TypeError(
                f"cannot update {describe(pair.path)} inside a tuple at the root of the model (it is not an array "
                "that can be written in place); use a list or a dict, or apply_gradients and keep its result"
            )


def check_depth(pairs: Iterable[Pair]) -> None:
    """A tree so deep that rebuilding it would exceed Python's recursion limit is refused
    before the step, not after the parameters were written."""
    depth = max((len(pair.keys) for pair in pairs), default=0)
    if depth < 64:
        return
    frame: FrameType | None = sys._getframe()
    used = 0
    while frame is not None:
        frame, used = frame.f_back, used + 1
    if used + 4 * depth + 64 > sys.getrecursionlimit():
        raise RecursionError(
            f"the tree is {depth} levels deep, too deep to rebuild within Python's recursion limit "
            f"({sys.getrecursionlimit()}); nothing was changed (raise it with sys.setrecursionlimit)"
        )


# ---------------------------------------------------------------------- running a rule
def compute_custom(group: Group, pairs: Iterable[Pair]) -> list[tuple[Pair, Array, dict[str, Array]]]:
    """A custom ``apply_single`` on every pair, on copies of the slot dicts: nothing written."""
    results = []
    for pair in pairs:
        slots = dict(pair.slots)
        results.append((pair, group.apply_single(pair.grad, pair.param, slots), slots))
    return results


def write_custom(results: Iterable[tuple[Pair, Array, dict[str, Array]]], in_place: bool) -> None:
    for pair, new_param, slots in results:
        pair.slots.update(slots)
        store_param(pair, new_param, in_place)


def run_one(group: Group, gradient: Array, parameter: Array, slots: dict[str, Array]) -> Array:
    """``group``'s rule on one parameter (the default ``apply_single``): the new parameter;
    ``slots`` are updated (kept as given: in the store's form, or as ``init_single`` makes them)."""
    pair = Pair((), gradient, parameter, backend_of(parameter))
    pair.slots = slots
    expected = group.store.expected(pair.shape, pair.dtype)
    stored = any(spec.stored for spec in expected.values()) and all(
        key in slots and slot_problem(slots[key], spec) is None for key, spec in expected.items()
    )
    (run_rule if stored else run_plain)(group, [pair], in_place=False)
    return pair.result


def coefficients(group: Group, first: Pair) -> dict[str, Any]:
    """The coefficients of a bucket: from the group's hyper-parameters with the route's
    options on top."""
    return group.scalars.coefficients(first.param, first.backend, first.options)


def run_rule(group: Group, pairs: list[Pair], in_place: bool, stacks: dict | None = None) -> None:
    """Run ``group``'s rule on pairs of one library, dtype, device and options: the reference
    every fast path is checked against. ``stacks``: a dict in which a caller that runs the
    same pairs every step keeps the stacking buffers of a stackable rule."""
    store = group.store
    if store.precision is not None:
        layouts = [store.layout(pair.shape, pair.dtype, pair.keys) for pair in pairs]
        if layouts[0] is not None:  # the pairs share a dtype: all are kept in another form
            run_stored(group, pairs, layouts, in_place, stacks)  # type: ignore[arg-type]
            return
    run_plain(group, pairs, in_place, stacks)


def run_stored(
    group: Group, pairs: list[Pair], layouts: list[Layout], in_place: bool, stacks: dict | None = None
) -> None:
    """The rule on slots kept in another form (``state_dtype``): each pair's slots are read
    into the compute dtype (with its gradient and parameter), the rule runs as it always does,
    and its results are encoded back into the stored form (:mod:`treeopt.precision`)."""
    store, backend = group.store, pairs[0].backend
    compute = layouts[0].compute
    proxies = []
    for pair, layout in zip(pairs, layouts):
        grad, param = pair.grad, pair.param
        if pair.dtype != compute:
            grad, param = backend.astype(grad, compute), backend.astype(param, compute)
        proxy = Pair(pair.keys, grad, param, backend, owned=False)
        proxy.options = pair.options
        proxy.slots = dict(zip(layout.forms, store.load(pair.slots, layout.forms, layout)))
        proxies.append(proxy)
    run_plain(group, proxies, False, stacks)
    for pair, proxy, layout in zip(pairs, proxies, layouts):
        noise = store.noise(pair.keys)
        for name in layout.forms:
            store.save(backend, pair.slots, name, proxy.slots[name], layout, noise)
        result = proxy.result
        if backend.dtype_name(result) != pair.dtype:
            result = backend.astype(result, pair.dtype)
        store_param(pair, result, in_place)


def run_plain(group: Group, pairs: list[Pair], in_place: bool, stacks: dict | None = None) -> None:
    """The rule on pairs whose slots are arrays of the dtype it computes in."""
    rule, store, first = group.scalars.rule, group.store, pairs[0]
    assert rule is not None  # run only for a group that runs its rule
    values = coefficients(group, first)
    # the slots a pair's rule takes follow its route's view, as they were made (a bucket shares its options)
    hyper = store.hyper(options=first.options) if callable(rule.slots) else None
    if rule.stackable and len(pairs) > 1:
        pairs = run_stacked(rule, store, values, pairs, hyper, in_place, stacks)
    for pair in pairs:
        names = rule.slot_names(pair.backend.shape(pair.param), hyper)
        with first.backend.quiet():
            new_param, *new_slots = rule.update(pair.grad, pair.param, *store.load(pair.slots, names), **values)
        for name, value in zip(names, new_slots):
            store.save(pair.backend, pair.slots, name, value)
        store_param(pair, new_param, in_place)


def stack_plan(
    rule: Rule, pairs: list[Pair], hyper: dict[str, Any] | None
) -> tuple[list[tuple[tuple[int, ...], tuple[str, ...]]], list[int]]:
    """How a stackable ``rule`` runs on ``pairs``: ``(runs, alone)``, each run the indices of
    same-shape pairs that share one call, with their slot names; ``alone``, the rest, in order."""

    backend = pairs[0].backend
    names = [rule.slot_names(backend.shape(pair.param), hyper) for pair in pairs]
    runs, alone = [], []
    for group in stacking.groups_by_shape([(tuple(backend.shape(pair.param)), n) for pair, n in zip(pairs, names)]):
        for run in stacking.chunks(backend, pairs[group[0]].param, group):
            if len(run) == 1:
                alone.append(run[0])
            else:
                runs.append((tuple(run), names[run[0]]))
    return runs, sorted(alone)


def run_stacked(
    rule: Rule,
    store: SlotStore,
    coefficients: dict[str, Any],
    pairs: list[Pair],
    hyper: dict[str, Any] | None,
    in_place: bool,
    stacks: dict | None = None,
) -> list[Pair]:
    """Run a stackable ``rule`` on the stacks of same-shape pairs (:func:`stack_plan`);
    returns the pairs left to run one by one. ``stacks`` (optional) keeps the plan and each
    run's stacking buffers from call to call, for a caller that runs the same pairs every step."""

    backend = pairs[0].backend
    plan = None if stacks is None else stacks.get("plan")
    if plan is None:
        plan = stack_plan(rule, pairs, hyper)
        if stacks is not None:
            stacks["plan"] = plan
    runs, alone = plan
    for run, slot_names in runs:
        chosen = [pairs[k] for k in run]
        buffers = None
        if stacks is not None:
            buffers = stacks.get(run)
            if buffers is None:
                like = chosen[0].param
                buffers = stacks[run] = [
                    backend.zeros((len(run),) + tuple(backend.shape(like)), like) for _ in range(2 + len(slot_names))
                ]
        new_param, *new_slots = stacking.update_stacked(
            rule.update,
            coefficients,
            backend,
            [pair.grad for pair in chosen],
            [pair.param for pair in chosen],
            [[store.load(pair.slots, (n,))[0] for pair in chosen] for n in slot_names],
            buffers,
        )
        writable = backend.writable
        if (
            in_place
            and backend.mutable
            and all(
                pair.owned and writable(pair.param) and all(writable(pair.slots[n]) for n in slot_names)
                for pair in chosen
            )
        ):  # the common case: one write per stack (a foreach copy on torch)
            for name, value in zip(slot_names, new_slots):
                backend.write_stack([pair.slots[name] for pair in chosen], value)
            backend.write_stack([pair.param for pair in chosen], new_param)
            for pair in chosen:
                pair.result = pair.param
            continue
        # one array per tensor (under jax.jit, in a form XLA compiles once per shape)
        slot_parts = [backend.unstack(value) for value in new_slots]
        for j, (pair, part) in enumerate(zip(chosen, backend.unstack(new_param))):
            for name, parts in zip(slot_names, slot_parts):
                store.save(backend, pair.slots, name, parts[j])
            store_param(pair, part, in_place)
    return [pairs[k] for k in alone]


def store_param(pair: Pair, value: Array, in_place: bool) -> None:
    if in_place and pair.owned and pair.backend.mutable and pair.backend.writable(pair.param):
        pair.backend.write(pair.param, value)
        pair.result = pair.param
    else:
        pair.result = pair.backend.as_array(value)


def _buckets(pairs: Iterable[Pair]) -> dict[tuple[Any, ...], list[Pair]]:
    buckets: dict[tuple[Any, ...], list[Pair]] = {}
    for pair in pairs:
        b = pair.backend
        key = (id(pair.group), b.name, b.dtype_name(pair.param), b.device(pair.param), pair.options)
        buckets.setdefault(key, []).append(pair)
    return buckets


# ---------------------------------------------------------------------- collecting pairs
def _child(node, key):
    if isinstance(node, dict):
        return node[key] if key in node else _MISSING
    if isinstance(node, (list, tuple)) and isinstance(key, int) and 0 <= key < len(node):
        return node[key]
    return _MISSING


def collect(gradients: Tree, parameters: Tree, name: str, check_pairs: bool = True) -> list[Pair]:
    """Every leaf of ``gradients`` with its parameter, checked, as :class:`Pair` s in
    flatten order; ``name`` (the optimizer's) starts every error message.

    With ``check_pairs=False`` (``init``), ``gradients`` is the parameter tree itself.
    """
    if not is_container(gradients):
        hint = ""
        if type(gradients).__module__.split(".")[0] in ("flax", "equinox", "jax"):
            hint = " (a JAX pytree: treeopt.jax.init, update and as_optax take it, and so does muon_adamw)"
        raise TypeError(
            f"{name}: expected a tree (dict, list or tuple) of arrays, got {type(gradients).__name__}{hint}"
        )
    pairs = []

    def walk(grad: Tree, param: Tree, keys: Keys) -> None:
        if is_container(grad):
            if not grad:  # MLX's placeholder where the model holds no array (a list of strings)
                return
            if param is not _MISSING and not is_container(param):
                raise ParameterError(
                    f"{name}: the gradients have a sub-tree at {describe(_trees.dotted(keys))} "
                    f"but the parameter there is a {type(param).__name__}",
                    _trees.dotted(keys),
                )
            for key, child in items(grad):
                walk(child, _MISSING if param is _MISSING else _child(param, key), keys + (key,))
        else:
            pairs.append(_pair(name, grad, param, keys, check_pairs))

    walk(gradients, parameters, ())
    return pairs


def _pair(name, grad, param, keys, check_pairs):
    path = _trees.dotted(keys)
    if grad is None:
        return Pair(keys, None, None if param is _MISSING else param)
    if param is _MISSING:
        raise MissingParameterError(
            f"{name}: there is a gradient for {describe(path)} but no parameter at that path", path
        )
    grad_backend, param_backend = backend_of(grad), backend_of(param)
    if param_backend is None:
        raise ParameterError(
            f"{name}: the parameter at {describe(path)} is a {type(param).__name__}, not an array", path
        )
    if grad_backend is None:
        raise ParameterError(f"{name}: the gradient at {describe(path)} is a {type(grad).__name__}, not an array", path)
    owned = True
    if param_backend.name == "python":  # a number: it becomes a float32 0-d array
        param_backend = numpy_backend if grad_backend.name == "python" else grad_backend
        param = param_backend.scalar_array(param, "float32", like=grad if grad_backend is param_backend else None)
        owned = False
    if grad_backend.name == "python":
        grad = param_backend.scalar_array(grad, param_backend.dtype_name(param), like=param)
        grad_backend = param_backend
    if check_pairs:
        _check_pair(name, path, grad, grad_backend, param, param_backend)
    if not param_backend.is_floating(param):
        raise ParameterError(
            f"{name}: the parameter at {describe(path)} has dtype {param_backend.dtype_name(param)}; "
            "only floating-point parameters can be optimized",
            path,
        )
    return Pair(keys, grad, param, param_backend, owned)


def _check_pair(name: str, path: str, grad: Array, grad_backend: Backend, param: Array, param_backend: Backend) -> None:
    if grad_backend is not param_backend:
        raise ParameterError(
            f"{name}: the gradient at {describe(path)} is a {grad_backend.name} array but the "
            f"parameter is a {param_backend.name} array",
            path,
        )
    g_shape, p_shape = tuple(grad_backend.shape(grad)), tuple(param_backend.shape(param))
    if g_shape != p_shape:
        raise ParameterError(
            f"{name}: the gradient at {describe(path)} has shape {g_shape} but the parameter has shape {p_shape}", path
        )
    g_dtype, p_dtype = grad_backend.dtype_name(grad), param_backend.dtype_name(param)
    if g_dtype != p_dtype:
        raise ParameterError(
            f"{name}: the gradient at {describe(path)} is {g_dtype} but the parameter is "
            f"{p_dtype}; cast the gradient to the parameter's dtype",
            path,
        )
    g_device, p_device = grad_backend.device(grad), param_backend.device(param)
    if g_device != p_device:
        raise ParameterError(
            f"{name}: the gradient at {describe(path)} is on {g_device} but the parameter is on {p_device}", path
        )


def with_results(tree: Tree, pairs: Iterator[Pair]) -> Tree:
    """``tree``'s structure with each leaf replaced by the next pair's result."""
    if is_container(tree):
        if isinstance(tree, dict):
            return rebuild(tree, ((k, with_results(v, pairs)) for k, v in tree.items()))
        return rebuild(tree, [with_results(v, pairs) for v in tree])
    return next(pairs).result
