"""The slot store: one optimizer's state dict, in MLX's layout, and what is known about it.

The dict is MLX's: ``step``, ``learning_rate``, scheduled hyper-parameters and running values
(the scalars, written by :class:`treeopt.scalars.Scalars`), and one dict of slots per
parameter, nested as the parameters are. A top-level parameter named like a scalar keeps its
slots under ``~name``.

Beside the dict the store keeps the ``(shape, dtype)`` of every parameter with state, the
slots a re-route carried over and not yet taken up, the state's array library once settled,
and a ``version`` that every mutator bumps: a compiled step is valid while the versions it
watches are unchanged.

What a slot holds is said in one place, :meth:`SlotStore.expected` (a :class:`SlotSpec` per
slot name), and checked by one validator (:func:`slot_problem`), for a state assigned from
outside as for the slots a step is about to use. The runner reads slots for compute through
:meth:`SlotStore.load` and writes results through :meth:`SlotStore.save`: a slot kept in
another form than the parameter's (lower precision) is decoded and encoded there.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, NamedTuple

from treeopt import _trees
from treeopt.backends import Backend, backend_of, numpy_backend
from treeopt.errors import ParameterError, describe
from treeopt.rules.base import Rule
from treeopt.tree import is_container, items, tree_map
from treeopt.types import Array, Keys, Shape, State, Tree

__all__ = ["RESERVED", "SlotStore", "SlotSpec", "slot_problem"]

#: state keys that are never parameter names; a top-level parameter with one of these names
#: (or the name of another scalar of the state) keeps its slots under the name prefixed with ``~``
RESERVED = ("step", "learning_rate")

_versions = itertools.count(1)  # one sequence for every store, scalars and router: never reused


def next_version() -> int:
    """A version number no object has had before (restoring a snapshot takes a new one too)."""
    return next(_versions)


class SlotSpec(NamedTuple):
    """How one slot is kept in the store: its shape and dtype there."""

    shape: Shape
    dtype: str


def slot_problem(
    value: Array, want: SlotSpec | None = None, backend: Backend | None = None, device: Any = None
) -> str | None:
    """What is wrong with ``value`` as a slot: it must be an array, and ``want`` (and of
    ``backend``, on ``device``) when given; the end of a sentence, or ``None`` when it fits."""
    found = backend_of(value)
    if found is None or found.name == "python" or is_container(value):
        return f"is a {type(value).__name__}, not an array"
    if want is None:
        return None
    if backend is not None and found is not backend:
        return f"is a {found.name} array but the parameter is a {backend.name} array"
    shape, dtype = tuple(found.shape(value)), found.dtype_name(value)
    if shape != tuple(want.shape):
        return f"has shape {shape}, expected {tuple(want.shape)}"
    if dtype != want.dtype:
        return f"is {dtype} but the parameter is {want.dtype}"
    if device is not None and found.device(value) != device:
        return f"is on {found.device(value)} but the parameter is on {device}"
    return None


class SlotStore:
    """One optimizer's state dict and its bookkeeping.

    Args:
        rule: the optimizer's rule, whose slots the store keeps (``None`` for an optimizer
            without one: its slots are whatever its ``init_single`` makes).
    """

    def __init__(self, rule: Rule | None = None) -> None:
        self.tree: State = {}
        #: entries of the dict that are scalars, not parameters (kept by the scalars)
        self.reserved: set[str] = set(RESERVED)
        self.rule = rule
        #: the optimizer's hyper-parameters as set (written by its scalars): a rule's slots
        #: may depend on them (Adafactor's first moment)
        self.settings: dict[str, Any] = {}
        #: the state's array library, settled at the first step (``None`` before)
        self.backend: Backend | None = None
        #: the slots are known to fit the parameters (``False`` after a state assignment: the
        #: next step checks them)
        self.checked = False
        #: keys -> ``(shape, dtype)`` of each parameter with state
        self.parameters: dict[Keys, tuple[Shape, str]] = {}
        #: keys -> slots to start from when the parameter is initialised (a re-route's carry)
        self.carried: dict[Keys, dict[str, Array]] = {}
        self.version = next_version()

    # ------------------------------------------------------------------ reading
    def key(self, name: Any) -> Any:
        """The state key of a top-level parameter name (``~name`` for a reserved name)."""
        return "~" + name if name in self.reserved else name

    def slots(self, keys: Keys) -> dict[str, Array] | None:
        """The slot dict of the parameter at ``keys``, or ``None``."""
        return slots_in(self.tree, keys, self.reserved)

    def items(self) -> Iterator[tuple[Keys, dict[str, Array]]]:
        """``(keys, slot dict)`` of every parameter with state, in state order."""
        return slot_items(self.tree, self.reserved)

    def expected(self, shape: Shape, dtype: str) -> dict[str, SlotSpec]:
        """What each slot of a parameter of ``shape`` and ``dtype`` holds in the store."""
        if self.rule is None:
            return {}
        shapes = self.rule.slot_shapes(tuple(shape), self.settings)
        return {name: SlotSpec(tuple(s), dtype) for name, s in shapes.items()}

    # ------------------------------------------------------------------ the runner's view
    def load(self, slots: dict[str, Array], names: Iterable[str]) -> list[Array]:
        """The slots ``names`` as the rule computes with them."""
        return [slots[n] for n in names]

    def save(self, backend: Backend, slots: dict[str, Array], name: str, value: Array) -> None:
        """Keep ``value``, the rule's new slot ``name``: written into the slot's array where
        the library allows it (references into the state stay valid), else put in its place."""
        old = slots[name]
        if backend.mutable and backend.writable(old):
            if value is not old:
                backend.write(old, value)
        else:
            slots[name] = backend.as_array(value)

    # ------------------------------------------------------------------ mutators (each bumps the version)
    def replace(self, tree: State) -> None:
        """Adopt ``tree`` (checked by the caller) as the state: its slots are checked against
        the parameters at the next step, and its library is settled again."""
        self.tree, self.checked, self.backend = tree, False, None
        self.version = next_version()

    def settle(self, backend: Backend | None) -> None:
        """Settle the state's array library; the scalars move to it."""
        if backend is None or self.backend is backend:
            return
        self.backend = backend
        for key, value in list(self.tree.items()):
            owner = backend_of(value)
            if owner is not None and owner is not backend and not is_container(value):
                self.tree[key] = backend.scalar_array(owner.to_numpy(value), owner.dtype_name(value))
        self.version = next_version()

    def create(
        self, parameters: Tree, keys: Collection[Keys], init_single: Callable[[Array, dict[str, Array]], None]
    ) -> None:
        """Mirror ``parameters`` into the state, with slots made by ``init_single`` for the
        parameters at ``keys`` (existing slots are kept: additive)."""
        tree, known, carried = self.tree, self.parameters, self.carried

        def select(leaf_keys: Keys, leaf: Array) -> bool:
            if leaf_keys not in keys:
                return False
            known[leaf_keys] = _info(leaf)
            return True

        def init_leaf(leaf_keys: Keys, param: Array, slots: dict[str, Array]) -> None:
            backend = backend_of(param)
            assert backend is not None  # the step checked every parameter
            if backend.name == "python":
                param = (self.backend or numpy_backend).scalar_array(param, "float32")
            init_single(param, slots)
            given = carried.pop(leaf_keys, None)
            if given:  # slots handed over by a re-route with state="carry"
                for name, value in given.items():
                    if name in slots and _fits(value, slots[name]):
                        slots[name] = value

        self.version = next_version()
        for key, child in items(parameters) if is_container(parameters) else ():
            if not is_container(child):
                if (key,) not in keys:
                    continue
                known[(key,)] = _info(child)
            state_key = self.key(key)
            found = _trees.lookup(tree, state_key)
            if found is not None and state_key not in tree:
                del tree[str(state_key)]
            tree[state_key] = _trees.mirror(found, child, select, init_leaf, (key,))

    def drop(self, keys: Keys) -> dict[str, Array]:
        """Forget the state of the parameter at ``keys``; returns its slots."""
        self.version = next_version()
        slots = self.slots(keys) or {}
        if slots:
            root = self.key(keys[0])
            if _trees.lookup(self.tree, root) is not None and root not in self.tree:
                root = str(root)
            self.tree[root] = _trees.assign(self.tree[root], keys[1:], {})
        self.parameters.pop(keys, None)
        return dict(slots)

    def carry(self, keys: Keys, slots: dict[str, Array]) -> None:
        """Keep ``slots`` for the parameter at ``keys``, to start from when it is initialised
        (added to what is carried already)."""
        self.carried = {**self.carried, keys: {**self.carried.get(keys, {}), **slots}}
        self.version = next_version()

    def snapshot(self) -> Callable[[], None]:
        """A function that puts the store back as it is now: the dict's containers and the
        bookkeeping (arrays are not copied: what is snapshotted is what a commit or a load
        adds, not what a step writes)."""
        saved = (
            tree_map(lambda x: x, self.tree),
            self.backend,
            self.checked,
            dict(self.parameters),
            dict(self.carried),
        )

        def restore() -> None:
            self.tree, self.backend, self.checked, parameters, carried = saved
            self.parameters, self.carried = dict(parameters), dict(carried)
            self.version = next_version()

        return restore

    # ------------------------------------------------------------------ checks
    def check_slots(
        self, owner: str, path: str, param: Array, backend: Backend, slots: dict[str, Array], exact: bool
    ) -> None:
        """The slots a step is about to use must fit their parameter (its shape may have
        changed under the same path, or the state was set from outside): same names (only
        those, when ``exact``), library, shape, dtype and device; no silent broadcasting."""
        if self.rule is None:
            return
        shape = tuple(backend.shape(param))
        expected = self.expected(shape, backend.dtype_name(param))
        extra = sorted(set(slots) - set(expected))
        if exact and extra:
            raise ParameterError(
                f"{owner}: the state of {describe(path)} has slots {sorted(slots)}, and {owner} uses "
                f"{sorted(expected)}; {extra} belong to another optimizer's state",
                path,
            )
        device = backend.device(param)
        for slot, want in expected.items():
            if slot not in slots:
                raise ParameterError(
                    f"{owner}: the state of {describe(path)} has no slot {slot!r} (it has {sorted(slots)})", path
                )
            problem = slot_problem(slots[slot], want, backend, device)
            if problem is not None:
                if problem.startswith("has shape"):
                    problem += f" for a parameter of shape {shape}"
                raise ParameterError(f"{owner}: slot {slot!r} of {describe(path)} {problem}", path)

    def check_tree(self, tree: State, owner: str) -> None:
        """Raise a ``TypeError`` or ``ValueError`` naming what is wrong if the slots of
        ``tree`` cannot be this store's; nothing changes. Every slot must be an array; for
        parameters the store knows, the slots are its own (names), of the parameter's shape
        and dtype."""
        known = self.parameters
        for keys in known:
            slots = slots_in(tree, keys, self.reserved)
            if slots is not None and not (
                isinstance(slots, dict) and all(slot_problem(v) is None for v in slots.values())
            ):
                raise TypeError(
                    f"{owner}.state: the state of {_trees.dotted(keys)!r} must be a dict of arrays "
                    f"(slot name -> array), got {type(slots).__name__} {str(slots)[:40]}"
                )
        for keys, slots in slot_items(tree, self.reserved):
            path = _trees.dotted(keys)
            for slot, value in slots.items():
                if slot_problem(value) is not None:
                    raise TypeError(
                        f"{owner}.state: slot {slot!r} of {path!r} is a {type(value).__name__}, not an array"
                    )
            if self.rule is None or not known:
                continue
            if keys not in known:
                raise ValueError(
                    f"{owner}.state has slots for {path!r}, a parameter this optimizer does not hold "
                    f"(it holds {', '.join(sorted(_trees.dotted(k) for k in known))})"
                )
            expected = self.expected(*known[keys])
            if set(slots) != set(expected):
                raise ValueError(
                    f"{owner}.state: {path!r} has slots {sorted(slots)}, and {owner} keeps "
                    f"{sorted(expected)} (the state of another kind of optimizer?)"
                )
            for slot, value in slots.items():
                if slot_problem(value, expected[slot]) is not None:
                    found = backend_of(value)
                    assert found is not None  # an array: checked above
                    got, want = f"{found.dtype_name(value)}{list(found.shape(value))}", expected[slot]
                    raise ValueError(
                        f"{owner}.state: slot {slot!r} of {path!r} is {got}; the parameter needs "
                        f"{want.dtype}{list(want.shape)}"
                    )


def _info(param: Array) -> tuple[Shape, str]:
    """``(shape, dtype)`` of a parameter, as the store records it."""
    backend = backend_of(param)
    if backend is None or backend.name == "python":
        return (), "float32"  # a number becomes a float32 0-d array
    return tuple(backend.shape(param)), backend.dtype_name(param)


def _fits(value: Array, like: Array) -> bool:
    a, b = backend_of(value), backend_of(like)
    return (
        a is not None
        and a is b
        and tuple(a.shape(value)) == tuple(b.shape(like))
        and a.dtype_name(value) == b.dtype_name(like)
    )


# ---------------------------------------------------------------------- the layout
def slots_in(tree: State, keys: Keys, reserved: Collection[str]) -> dict[str, Array] | None:
    """The slot dict of the parameter at ``keys`` in the state dict ``tree``, or ``None``."""
    first = keys[0]
    node = _trees.lookup(tree, "~" + first if first in reserved else first)
    return _trees.lookup_path(node, keys[1:]) if node is not None else None


def slot_items(tree: State, reserved: Collection[str]) -> Iterator[tuple[Keys, dict[str, Array]]]:
    """``(keys, slot dict)`` of every parameter with state in ``tree``, in state order."""

    def walk(node: Any, keys: Keys) -> Iterator[tuple[Keys, dict[str, Array]]]:
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

    for key, child in tree.items():
        if key in reserved:
            continue
        if isinstance(key, str) and key.startswith("~") and key[1:] in reserved:
            key = key[1:]
        yield from walk(child, (key,))
