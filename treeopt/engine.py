"""The step engine: how one step checks, commits and runs, whatever the optimizer.

A step goes in three phases, so that bad input never leaves the optimizer half-changed:

1. *Check*: walk the gradients with the parameters and check every pair (a parameter
   exists, same library, shape and dtype) and every state slot it will use. The optimizer
   decides the owner of each new path (``assign_owners``: a ``MultiOptimizer`` routes).
   Nothing is changed yet; any error names the parameter path.
2. *Commit*: record new routes (``commit``), create slots for new parameters, evaluate
   schedules and increment the step of every optimizer (``advance``).
3. *Run*: group the pairs by (optimizer, library, dtype, device), compute each group's
   coefficients once, and run the optimizer's rule on each pair.

The engine talks to optimizers through a small interface, written once here and
implemented by :class:`~treeopt.optimizer.Optimizer` (and overridden where routing differs by
:class:`~treeopt.multi.MultiOptimizer`):

- ``stateful()``: the optimizers that hold state and take steps (itself, or every group);
- ``assign_owners(pairs)`` and ``commit(backend)``: who owns each pair, decided during the
  checks and recorded at the commit;
- ``prepare_step(pairs, owners)``: whole-model work between checks and commit;
- ``book``: a :class:`Book`, what the engine keeps about a stateful optimizer beside its
  state dict;
- ``scalar_names()``, ``advance()``, ``coefficients(like, backend)``,
  ``rule_hyperparameters()`` and ``runs_rule``: its scalars, schedules and rule.

Routing, plans, checkpoints, kernels and the integrations use the same interface, and the
state-layout functions below (:func:`slots_at`, :func:`slot_items`, :func:`drop`), never an
optimizer's private attributes.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from treeopt import _trees
from treeopt.backends import backend_of, numpy_backend
from treeopt.errors import MissingParameterError, ParameterError, describe
from treeopt.precision import Layout, Noise
from treeopt.rules.base import rule_checked
from treeopt.tree import is_container, items, rebuild
from treeopt.types import Array, Keys, Shape, State, Tree

if TYPE_CHECKING:
    from treeopt.backends import Backend
    from treeopt.optimizer import Optimizer
    from treeopt.rules.base import Rule

__all__ = [
    "Book",
    "Pair",
    "collect",
    "step",
    "initialize",
    "write_back",
    "run_rule",
    "slots_at",
    "slot_items",
    "drop",
    "with_results",
    "RESERVED",
]

_MISSING = object()
#: state keys that are never parameter names; a top-level parameter with one of these names
#: (or the name of another scalar of the state) keeps its slots under the name prefixed with ``~``
RESERVED = ("step", "learning_rate")


@dataclass
class Book:
    """What the engine keeps about one optimizer beside its state dict."""

    #: the state's array library, settled at the first step (``None`` before)
    backend: Backend | None = None
    #: the slots are known to fit the parameters (``False`` after a state assignment: the next
    #: step checks them)
    initialized: bool = False
    #: keys -> ``(shape, dtype)`` of each parameter with state
    parameters: dict[Keys, tuple[Shape, str]] = field(default_factory=dict)
    #: keys -> slots to start from when the parameter is initialised (``reroute(state="carry")``)
    carried: dict[Keys, dict[str, Array]] = field(default_factory=dict)
    #: bumped by every change a compiled step depends on
    version: int = 0

    def copy(self) -> Book:
        return Book(self.backend, self.initialized, dict(self.parameters), dict(self.carried), self.version)


class Pair:
    """One gradient and its parameter in one step: where they are, and what the step decides."""

    __slots__ = ("keys", "grad", "param", "backend", "owner", "slots", "result", "owned")
    keys: Keys
    grad: Array  # None: no step for this parameter
    param: Array
    #: the library of ``grad`` and ``param`` (``None`` only in a pair without a gradient, which never runs)
    backend: Backend
    #: the stateful optimizer that updates it, and its slots (``None`` until the step routes it; a
    #: routed pair's slots are a dict once the commit mirrored them)
    owner: Optimizer
    slots: Any
    result: Array
    owned: bool

    def __init__(
        self, keys: Keys, grad: Array, param: Array, backend: Backend | None = None, owned: bool = True
    ) -> None:
        self.keys, self.grad, self.param, self.backend = keys, grad, param, backend  # type: ignore[assignment]
        self.owned = owned  # the param is the caller's own array (not made from a number)
        self.owner = self.slots = None  # type: ignore[assignment]
        self.result = param

    @property
    def path(self) -> str:
        return _trees.dotted(self.keys)


# ---------------------------------------------------------------------- the step
def step(
    optimizer: Optimizer, gradients: Tree, parameters: Tree, in_place: bool
) -> tuple[Tree, list[Pair], list[Pair], list[Optimizer]]:
    """One step: ``(new tree, every pair, the pairs updated, the optimizers that stepped)``."""
    # 1. check
    pairs = collect(gradients, parameters, type(optimizer).__name__)
    active = [pair for pair in pairs if pair.grad is not None]
    backend = settle_backend(optimizer, active)
    owners = optimizer.assign_owners(active)
    kept = [(pair, owner) for pair, owner in zip(active, owners) if owner is not None]  # None: frozen
    active, owners = [pair for pair, _ in kept], [owner for _, owner in kept]
    to_mirror: dict[Optimizer, set[Keys]] = {}  # owner -> keys of the pairs it must (re)mirror into its state
    for pair, owner in kept:
        pair.owner = owner
        pair.slots = slots_at(owner, pair.keys)
        if pair.slots and owner.rule is not None:
            check_slots(owner, pair)  # every step: a parameter may have changed shape under its path
        if not pair.slots or not owner.book.initialized:
            to_mirror.setdefault(owner, set()).add(pair.keys)
    _check_rules(active)
    if in_place:
        check_write_back(parameters, active)
    check_depth(pairs)
    active, owners, stepping, commit_hook = optimizer.prepare_step(active, owners)
    updating = {(id(pair.owner), pair.keys) for pair in active}  # a skipped pair gets no state yet
    to_mirror = {o: {k for k in keys if (id(o), k) in updating} for o, keys in to_mirror.items()}
    scheduled = [(stateful, stateful.scheduled_values()) for stateful in stepping]  # may raise: before any write
    # 2. commit: only bookkeeping and new slots, undone if anything here fails
    restore = optimizer.snapshot()
    try:
        optimizer.commit(backend)
        if commit_hook is not None:
            commit_hook()
        for owner, keys in to_mirror.items():
            if not keys:
                continue
            mirror(owner, parameters, keys)
            for pair in active:
                if pair.owner is owner:
                    pair.slots = slots_at(owner, pair.keys)
        for stateful in optimizer.stateful():
            stateful.book.initialized = True
        for stateful, values in scheduled:
            stateful.advance(values)
    except BaseException:
        restore()
        raise
    # 3. run: every input was checked above. User code (a custom apply_single) runs first,
    # into temporaries, and a failure there still undoes the commit; then everything is written.
    groups = list(_buckets(active).values())
    try:
        custom = {
            id(group[0]): compute_custom(group[0].owner, group) for group in groups if not group[0].owner.runs_rule
        }
    except BaseException:
        restore()
        raise
    for group in groups:
        if group[0].owner.runs_rule:
            run_rule(group[0].owner, group, in_place)
        else:
            write_custom(custom[id(group[0])], in_place)
    return with_results(gradients, iter(pairs)), pairs, active, stepping


def initialize(optimizer: Optimizer, parameters: Tree) -> None:
    """Create the state of every parameter in ``parameters`` that has none yet (additive)."""
    pairs = [
        pair
        for pair in collect(parameters, parameters, type(optimizer).__name__, check_pairs=False)
        if pair.grad is not None
    ]
    backend = settle_backend(optimizer, pairs)
    owners = optimizer.assign_owners(pairs)
    optimizer.commit(backend)
    for owner, keys in _group_keys(pairs, owners).items():
        if owner is not None:  # None: frozen
            mirror(owner, parameters, keys)
    for stateful in optimizer.stateful():
        stateful.book.initialized = True


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


def settle_backend(optimizer: Optimizer, pairs: Iterable[Pair]) -> Backend | None:
    """The one array library of these pairs and of the state; checked, not adopted."""
    expected = next((o.book.backend for o in optimizer.stateful() if o.book.backend is not None), None)
    first = None
    for pair in pairs:
        if expected is None:
            expected, first = pair.backend, pair
        elif pair.backend is not expected:
            other = f"{describe(first.path)} is a" if first else "the optimizer state holds"
            raise ParameterError(
                f"{type(optimizer).__name__}: {describe(pair.path)} is a {pair.backend.name} array, but "
                f"{other} {expected.name} array; one optimizer works on arrays of one library",
                pair.path,
            )
    return expected


def check_slots(optimizer: Optimizer, pair: Pair) -> None:
    """The slots must fit their parameter (its shape may have changed under the same path, or
    the state was set from outside): same names, library, shape, dtype and device; no
    silent broadcasting, no slot of another optimizer's meaning. A slot stored in another form
    (``state_dtype``) must have that form's entries, shapes and dtypes."""
    name = type(optimizer).__name__
    dtype, device = pair.backend.dtype_name(pair.param), pair.backend.device(pair.param)
    expected = optimizer.slot_entries(tuple(pair.backend.shape(pair.param)), dtype)
    if optimizer.runs_rule and set(pair.slots) != set(expected):
        extra = sorted(set(pair.slots) - set(expected))
        if extra:
            raise ParameterError(
                f"{name}: the state of {describe(pair.path)} has slots {sorted(pair.slots)}, and {name} "
                f"uses {sorted(expected)}; {extra} belong to another optimizer's state",
                pair.path,
            )
    for slot, (shape, slot_dtype) in expected.items():
        if slot not in pair.slots:
            raise ParameterError(
                f"{name}: the state of {describe(pair.path)} has no slot {slot!r} (it has {sorted(pair.slots)})",
                pair.path,
            )
        value = pair.slots[slot]
        backend = backend_of(value)
        if backend is None or backend.name == "python":
            raise ParameterError(
                f"{name}: slot {slot!r} of {describe(pair.path)} is a {type(value).__name__}, not an array", pair.path
            )
        if backend is not pair.backend:
            raise ParameterError(
                f"{name}: slot {slot!r} of {describe(pair.path)} is a {backend.name} array but the parameter "
                f"is a {pair.backend.name} array",
                pair.path,
            )
        if tuple(backend.shape(value)) != shape:
            raise ParameterError(
                f"{name}: slot {slot!r} of {describe(pair.path)} has shape {tuple(backend.shape(value))}, "
                f"expected {shape} for a parameter of shape {tuple(pair.backend.shape(pair.param))}",
                pair.path,
            )
        if backend.dtype_name(value) != slot_dtype:
            stored = "the parameter is" if slot_dtype == dtype else "its state_dtype stores it as"
            raise ParameterError(
                f"{name}: slot {slot!r} of {describe(pair.path)} is {backend.dtype_name(value)} but {stored} "
                f"{slot_dtype}",
                pair.path,
            )
        if backend.device(value) != device:
            raise ParameterError(
                f"{name}: slot {slot!r} of {describe(pair.path)} is on {backend.device(value)} but the parameter "
                f"is on {device}",
                pair.path,
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
def run(optimizer: Optimizer, pairs: list[Pair], in_place: bool) -> None:
    """One optimizer's step on pairs of one library, dtype and device."""
    if optimizer.runs_rule:
        run_rule(optimizer, pairs, in_place)
        return
    write_custom(compute_custom(optimizer, pairs), in_place)


def compute_custom(optimizer: Optimizer, pairs: Iterable[Pair]) -> list[tuple[Pair, Array, dict[str, Array]]]:
    """A custom ``apply_single`` on every pair, on copies of the slot dicts: nothing written."""
    results = []
    for pair in pairs:
        slots = dict(pair.slots)
        results.append((pair, optimizer.apply_single(pair.grad, pair.param, slots), slots))
    return results


def write_custom(results: Iterable[tuple[Pair, Array, dict[str, Array]]], in_place: bool) -> None:
    for pair, new_param, slots in results:
        pair.slots.update(slots)
        store_param(pair, new_param, in_place)


def run_rule(optimizer: Optimizer, pairs: list[Pair], in_place: bool, stacks: dict | None = None) -> None:
    """Run ``optimizer``'s rule on pairs of one library, dtype and device: the reference
    every fast path is checked against. ``stacks``: a dict in which a caller that runs the
    same pairs every step keeps the stacking buffers of a stackable rule."""
    if optimizer.precision is not None:
        layouts = [
            optimizer.state_layout(pair.backend.shape(pair.param), pair.backend.dtype_name(pair.param))
            for pair in pairs
        ]
        if layouts[0] is not None:  # a group's pairs share the dtype: all are stored forms
            run_stored(optimizer, pairs, layouts, in_place, stacks)  # type: ignore[arg-type]
            return
    _run_rule(optimizer, pairs, in_place, stacks)


def run_stored(
    optimizer: Optimizer, pairs: list[Pair], layouts: list[Layout], in_place: bool, stacks: dict | None = None
) -> None:
    """The rule on slots stored in another form (``state_dtype``): each pair's slots are read
    into the compute dtype, the rule runs as it always does, and its results are encoded back
    into the stored form (:mod:`treeopt.precision`)."""
    backend = pairs[0].backend
    compute = layouts[0].compute
    proxies = []
    for pair, layout in zip(pairs, layouts):
        grad, param = pair.grad, pair.param
        if backend.dtype_name(param) != compute:
            grad, param = backend.astype(grad, compute), backend.astype(param, compute)
        proxy = Pair(pair.keys, grad, param, backend, owned=False)
        proxy.slots = {name: form.load(backend, pair.slots, name, compute) for name, form in layout.forms.items()}
        proxies.append(proxy)
    _run_rule(optimizer, proxies, False, stacks)
    step = optimizer.noise_step()
    for pair, proxy, layout in zip(pairs, proxies, layouts):
        noise = Noise(optimizer.precision.seed, pair.path, step)  # type: ignore[union-attr]  # set: layouts exist
        for name, form in layout.forms.items():
            for key, value in form.encode(backend, name, proxy.slots[name], noise).items():
                store_slot(backend, pair.slots, key, value)
        result = proxy.result
        if backend.dtype_name(result) != backend.dtype_name(pair.param):
            result = backend.astype(result, backend.dtype_name(pair.param))
        store_param(pair, result, in_place)


def _run_rule(optimizer: Optimizer, pairs: list[Pair], in_place: bool, stacks: dict | None = None) -> None:
    rule, first = optimizer.rule, pairs[0]
    assert rule is not None  # run only for an optimizer that runs its rule
    coefficients = optimizer.coefficients(first.param, first.backend)
    hyper = optimizer.rule_hyperparameters() if callable(rule.slots) else None
    if rule.stackable and len(pairs) > 1:
        pairs = run_stacked(rule, coefficients, pairs, hyper, in_place, stacks)
    for pair in pairs:
        names = rule.slot_names(pair.backend.shape(pair.param), hyper)
        slots = pair.slots
        with first.backend.quiet():
            new_param, *new_slots = rule.update(pair.grad, pair.param, *(slots[n] for n in names), **coefficients)
        for name, value in zip(names, new_slots):
            store_slot(pair.backend, slots, name, value)
        store_param(pair, new_param, in_place)


def _check_rules(pairs: Iterable[Pair]) -> None:
    """Compute each rule's coefficients once before the commit, so that a rule whose
    coefficients do not fit its update fails before anything changes (checked once per rule)."""
    seen: set[int] = set()
    for pair in pairs:
        owner = pair.owner
        rule = owner.rule
        if owner.runs_rule and rule is not None and id(owner) not in seen and not rule_checked(rule):
            seen.add(id(owner))
            owner.check_rule()


def stack_plan(
    rule: Rule, pairs: list[Pair], hyper: dict[str, Any] | None
) -> tuple[list[tuple[tuple[int, ...], tuple[str, ...]]], list[int]]:
    """How a stackable ``rule`` runs on ``pairs``: ``(runs, alone)``, each run the indices of
    same-shape pairs that share one call, with their slot names; ``alone``, the rest, in order."""
    from treeopt.kernels import stacking

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
    coefficients: dict[str, Any],
    pairs: list[Pair],
    hyper: dict[str, Any] | None,
    in_place: bool,
    stacks: dict | None = None,
) -> list[Pair]:
    """Run a stackable ``rule`` on the stacks of same-shape pairs (:func:`stack_plan`);
    returns the pairs left to run one by one. ``stacks`` (optional) keeps the plan and each
    run's stacking buffers from call to call, for a caller that runs the same pairs every step."""
    from treeopt.kernels import stacking

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
            [[pair.slots[n] for pair in chosen] for n in slot_names],
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
        for j, pair in enumerate(chosen):
            for name, value in zip(slot_names, new_slots):
                store_slot(backend, pair.slots, name, value[j])
            store_param(pair, new_param[j], in_place)
    return [pairs[k] for k in alone]


def store_slot(backend: Backend, slots: dict[str, Array], name: str, value: Array) -> None:
    old = slots[name]
    if backend.mutable and backend.writable(old):
        if value is not old:
            backend.write(old, value)
    else:
        slots[name] = backend.as_array(value)


def store_param(pair: Pair, value: Array, in_place: bool) -> None:
    if in_place and pair.owned and pair.backend.mutable and pair.backend.writable(pair.param):
        pair.backend.write(pair.param, value)
        pair.result = pair.param
    else:
        pair.result = pair.backend.as_array(value)


def _buckets(pairs: Iterable[Pair]) -> dict[tuple[int, str, str, str], list[Pair]]:
    groups: dict[tuple[int, str, str, str], list[Pair]] = {}
    for pair in pairs:
        b = pair.backend
        key = (id(pair.owner), b.name, b.dtype_name(pair.param), b.device(pair.param))
        groups.setdefault(key, []).append(pair)
    return groups


def _group_keys(pairs: Iterable[Pair], owners: Iterable[Optimizer | None]) -> dict[Optimizer | None, set[Keys]]:
    grouped: dict[Optimizer | None, set[Keys]] = {}
    for pair, owner in zip(pairs, owners):
        grouped.setdefault(owner, set()).add(pair.keys)
    return grouped


# ---------------------------------------------------------------------- the state's layout
class StateHolder(Protocol):
    """What the layout functions read: an optimizer, or a candidate state being checked."""

    @property
    def state(self) -> State: ...

    def scalar_names(self) -> list[str]: ...


def state_key(optimizer: StateHolder, key: Any) -> Any:
    """The state key of a top-level parameter name (``~name`` for a reserved name)."""
    return "~" + key if key in RESERVED or key in optimizer.scalar_names() else key


def slots_at(optimizer: StateHolder, keys: Keys) -> dict[str, Array] | None:
    """The slot dict of the parameter at ``keys``, or ``None``."""
    node = _trees.lookup(optimizer.state, state_key(optimizer, keys[0]))
    return _trees.lookup_path(node, keys[1:]) if node is not None else None


def slot_items(optimizer: StateHolder) -> Iterator[tuple[Keys, dict[str, Array]]]:
    """``(keys, slot dict)`` of every parameter with state, in state order."""
    scalars = set(optimizer.scalar_names())

    def walk(node, keys):
        if isinstance(node, dict):
            if node and not any(is_container(v) for v in node.values()):
                yield keys, node
                return
            children: Iterable[tuple[Any, Any]] = node.items()
        elif isinstance(node, (list, tuple)):
            children = enumerate(node)
        else:
            return
        for key, child in children:
            yield from walk(child, keys + (key,))

    for key, child in optimizer.state.items():
        if key in scalars:
            continue
        if isinstance(key, str) and key.startswith("~") and key[1:] in (*RESERVED, *scalars):
            key = key[1:]
        yield from walk(child, (key,))


def drop(optimizer: Optimizer, keys: Keys) -> dict[str, Array]:
    """Forget the state of the parameter at ``keys``; returns its slots."""
    optimizer.book.version += 1
    state = optimizer.state
    slots = slots_at(optimizer, keys) or {}
    if slots:
        root_key = state_key(optimizer, keys[0])
        if _trees.lookup(state, root_key) is not None and root_key not in state:
            root_key = str(root_key)
        state[root_key] = _trees.assign(state[root_key], keys[1:], {})
    optimizer.book.parameters.pop(keys, None)
    return dict(slots)


def mirror(optimizer: Optimizer, parameters: Tree, keys: Collection[Keys]) -> None:
    """Mirror ``parameters`` into the state, with slots for the parameters at ``keys``."""
    book, state = optimizer.book, optimizer.state

    def select(leaf_keys: Keys, leaf: Array) -> bool:
        if leaf_keys not in keys:
            return False
        book.parameters[leaf_keys] = _info(leaf)
        return True

    def init_leaf(leaf_keys: Keys, param: Array, slots: dict[str, Array]) -> None:
        backend = backend_of(param)
        assert backend is not None  # the step checked every parameter
        if backend.name == "python":
            param = (book.backend or numpy_backend).scalar_array(param, "float32")
        optimizer.init_single(param, slots)
        carried = book.carried.pop(leaf_keys, None)
        if carried:  # slots handed over by MultiOptimizer.reroute(..., state="carry")
            for name, value in carried.items():
                if name in slots and _fits(value, slots[name]):
                    slots[name] = value

    book.version += 1
    entries = items(parameters) if is_container(parameters) else ()
    for key, child in entries:
        if not is_container(child):
            if (key,) not in keys:
                continue
            book.parameters[(key,)] = _info(child)
        skey = state_key(optimizer, key)
        found = _trees.lookup(state, skey)
        if found is not None and skey not in state:
            del state[str(skey)]
        state[skey] = _trees.mirror(found, child, select, init_leaf, (key,))


def _info(param):
    """``(shape, dtype)`` of a parameter, for plans."""
    backend = backend_of(param)
    if backend is None or backend.name == "python":
        return (), "float32"  # a number becomes a float32 0-d array
    return tuple(backend.shape(param)), backend.dtype_name(param)


def _fits(value, like):
    a, b = backend_of(value), backend_of(like)
    return (
        a is not None
        and a is b
        and tuple(a.shape(value)) == tuple(b.shape(like))
        and a.dtype_name(value) == b.dtype_name(like)
    )


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
        raise TypeError(f"{name}: expected a tree (dict, list or tuple) of arrays, got {type(gradients).__name__}")
    pairs = []

    def walk(grad: Tree, param: Tree, keys: Keys) -> None:
        if is_container(grad):
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
