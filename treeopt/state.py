"""The slot store: one optimizer's state dict, in MLX's layout, and what is known about it.

The dict is MLX's: ``step``, ``learning_rate``, scheduled hyper-parameters and running values
(the scalars, written by :class:`treeopt.scalars.Scalars`), and one dict of slots per
parameter, nested as the parameters are. A top-level parameter named like a scalar keeps its
slots under ``~name``.

Beside the dict the store keeps the ``(shape, dtype)`` of every parameter with state, the
options of its route, the slots a re-route carried over and not yet taken up, the state's
array library once settled, and a ``version`` that every mutator bumps: a compiled step is
valid while the versions it watches are unchanged.

What a slot holds is said in one place, :meth:`SlotStore.expected` (a :class:`SlotSpec` per
slot name), and checked by one validator (:func:`slot_problem`), for a state assigned from
outside as for the slots a step is about to use. A rule's slots may depend on its
hyper-parameters (NorMuon keeps one value per neuron of each matrix, and which axis is a
neuron depends on Muon's ``layout`` and ``batch_axes``); those are read in one place too,
:meth:`SlotStore.hyper`: the optimizer's settings with the options of the parameter's route
on top (a ``Conv1D`` read ``(in, out)``, a stack of experts), so slots are created, checked,
planned and checkpointed for the view the rule computes with. The runner reads slots for
compute through :meth:`SlotStore.load` and writes results through :meth:`SlotStore.save`: a
slot kept in another form than the parameter's (lower precision) is decoded and encoded there.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, NamedTuple

from treeopt import _trees
from treeopt.backends import Backend, as_float, backend_of, numpy_backend
from treeopt.errors import ParameterError, describe
from treeopt.precision import Layout, Noise, StatePrecision, layout as precision_layout
from treeopt.rules.base import Rule
from treeopt.tree import is_container, items, tree_map
from treeopt.types import Array, Keys, Options, Shape, State, Tree

__all__ = ["CONTEXT", "RESERVED", "Part", "SlotStore", "SlotSpec", "slot_problem"]

#: state keys that are never parameter names; a top-level parameter with one of these names
#: (or the name of another scalar of the state) keeps its slots under the name prefixed with ``~``
RESERVED = ("step", "learning_rate")

#: settings the code around a step gives (``{name: value}``), read by settings left ``None``
#: that have a default (:func:`treeopt.scalars.context`)
CONTEXT: ContextVar[Mapping[str, Any]] = ContextVar("treeopt_settings", default=MappingProxyType({}))

_versions = itertools.count(1)  # one sequence for every store, scalars and router: never reused


def next_version() -> int:
    """A version number no object has had before (restoring a snapshot takes a new one too)."""
    return next(_versions)


class SlotSpec(NamedTuple):
    """How one slot is kept in the store: its shape and dtype there."""

    shape: Shape
    dtype: str
    #: kept in another form than the parameter's (a ``state_dtype``)
    stored: bool = False


class Part(NamedTuple):
    """A parameter the store holds in part (a shard of rows on one rank): the whole tensor's
    shape, and the index of the part's first element in it."""

    whole: Shape
    offset: int


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
        return f"is {dtype} but {'its state_dtype stores it as' if want.stored else 'the parameter is'} {want.dtype}"
    if device is not None and found.device(value) != device:
        return f"is on {found.device(value)} but the parameter is on {device}"
    return None


class SlotStore:
    """One optimizer's state dict and its bookkeeping.

    Args:
        rule: the optimizer's rule, whose slots the store keeps (``None`` for an optimizer
            without one: its slots are whatever its ``init_single`` makes).
        precision: how the slots are stored (``state_dtype``, :mod:`treeopt.precision`);
            ``None``: in the parameter's dtype, as MLX keeps them.
    """

    def __init__(self, rule: Rule | None = None, precision: StatePrecision | None = None) -> None:
        self.tree: State = {}
        #: entries of the dict that are scalars, not parameters (kept by the scalars)
        self.reserved: set[str] = set(RESERVED)
        self.rule = rule
        #: the optimizer's hyper-parameters as set (written by its scalars): a rule's slots
        #: may depend on them (Adafactor's first moment)
        self.settings: dict[str, Any] = {}
        #: settings that, left ``None``, take their value from the code around the step
        #: (:data:`CONTEXT`), else this default (Muon's layout: flax's under treeopt.jax)
        self.defaults: dict[str, Any] = {}
        #: the state's array library, settled at the first step (``None`` before)
        self.backend: Backend | None = None
        #: the slots are known to fit the parameters (``False`` after a state assignment: the
        #: next step checks them)
        self.checked = False
        #: keys -> ``(shape, dtype)`` of each parameter with state
        self.parameters: dict[Keys, tuple[Shape, str]] = {}
        #: keys -> the options of its route that its slots were made for (those with none: absent)
        self.options: dict[Keys, Options] = {}
        #: keys -> slots to start from when the parameter is initialised (a re-route's carry)
        self.carried: dict[Keys, dict[str, Array]] = {}
        self.precision = precision
        #: keys -> the part held of a parameter split across ranks (its stored forms are the
        #: whole tensor's: random bits by the element's index in it, int8 judged by its size)
        self.parts: dict[Keys, Part] = {}
        self.version = next_version()

    # ------------------------------------------------------------------ reading
    def key(self, name: Any) -> Any:
        """The state key of a top-level parameter name (``~name`` for a reserved name)."""
        return "~" + name if name in self.reserved else name

    def started(self) -> bool:
        """Whether steps were taken. Inside a compiled function (``mx.compile``, ``jax.jit``)
        the count cannot be read: as if they were, so that nothing planned on it changes while
        it is traced."""
        try:
            return int(as_float(self.tree["step"])) > 0
        except (ValueError, TypeError):  # MLX refuses to evaluate, JAX's tracer to concretise
            return True

    def slots(self, keys: Keys) -> dict[str, Array] | None:
        """The slot dict of the parameter at ``keys``, or ``None``."""
        return slots_in(self.tree, keys, self.reserved)

    def items(self) -> Iterator[tuple[Keys, dict[str, Array]]]:
        """``(keys, slot dict)`` of every parameter with state, in state order."""
        return slot_items(self.tree, self.reserved)

    def setting(self, name: str) -> Any:
        """Hyper-parameter ``name`` as the rule reads it: as set, or, left ``None``, its
        default (the one the code around the step gives first)."""
        value = self.settings[name]
        if value is None and name in self.defaults:
            return CONTEXT.get().get(name, self.defaults[name])
        return value

    def hyper(self, keys: Keys | None = None, options: Options | None = None) -> dict[str, Any]:
        """The hyper-parameters the slots of the parameter at ``keys`` follow: the optimizer's
        settings, with the options of its route on top (``options``: a step's, not recorded
        yet; else those recorded for ``keys``). The one place the two meet: slots are made,
        checked, planned and checkpointed from it, and the rule's coefficients too
        (:meth:`treeopt.scalars.Scalars.hyperparameters`)."""
        if options is None:
            options = self.options.get(keys, ()) if keys is not None else ()
        values = dict(self.settings)
        for name in self.defaults:
            if name in values and values[name] is None:
                values[name] = self.setting(name)
        values.update(options)
        return values

    def slot_shapes(self, shape: Shape, keys: Keys | None = None, options: Options | None = None) -> dict[str, Shape]:
        """The shape of each slot the rule computes with, for a parameter of ``shape`` (at
        ``keys``, routed with ``options``: see :meth:`hyper`)."""
        if self.rule is None:
            return {}
        hyper = self.hyper(keys, options) if callable(self.rule.slots) else None  # else: one per slot name
        return {name: tuple(s) for name, s in self.rule.slot_shapes(tuple(shape), hyper).items()}

    def zeros(self, param: Array, slots: dict[str, Array], keys: Keys | None = None) -> None:
        """Fill ``slots`` with the rule's new slots for ``param`` (at ``keys``): zeros of
        their shapes, or the parameter itself for a slot that starts there (schedule-free's
        ``z``)."""
        assert self.rule is not None  # an optimizer without a rule makes its own (init_single)
        backend = backend_of(param)
        assert backend is not None  # the engine gives arrays
        for name, shape in self.slot_shapes(tuple(backend.shape(param)), keys).items():
            slots[name] = backend.zeros(shape, param)
            if name in self.rule.copies_param:
                slots[name] = slots[name] + param

    def layout(
        self, shape: Shape, dtype: str, keys: Keys | None = None, options: Options | None = None
    ) -> Layout | None:
        """How the slots of the parameter at ``keys`` (of ``shape`` and ``dtype``, routed with
        ``options``) are stored and computed (:class:`treeopt.precision.Layout`), or ``None``:
        in the parameter's dtype."""
        if self.precision is None or self.rule is None:
            return None
        part = self.parts.get(keys) if keys is not None else None
        return precision_layout(
            self.precision,
            dtype,
            self.slot_shapes(shape, keys, options),
            self.rule.slot_meanings,
            whole=None if part is None else part.whole,
            shape=tuple(shape),
        )

    def expected(
        self, shape: Shape, dtype: str, keys: Keys | None = None, options: Options | None = None
    ) -> dict[str, SlotSpec]:
        """What the store keeps for a parameter of ``shape`` and ``dtype`` (at ``keys``,
        routed with ``options``): a :class:`SlotSpec` per entry (a slot, or the codes and
        scales of an int8 slot)."""
        shapes = self.slot_shapes(shape, keys, options)
        layout = self.layout(shape, dtype, keys, options)
        if layout is None:
            return {name: SlotSpec(s, dtype) for name, s in shapes.items()}
        return {key: SlotSpec(tuple(s), d, True) for key, (s, d) in layout.entries(shapes).items()}

    # ------------------------------------------------------------------ the runner's view
    def load(self, slots: dict[str, Array], names: Iterable[str], layout: Layout | None = None) -> list[Array]:
        """The slots ``names`` as the rule computes with them: as kept, or read from their
        stored form (``layout``) into arrays of its compute dtype."""
        if layout is None:
            return [slots[n] for n in names]
        loaded = []
        for name in names:
            backend = backend_of(slots[name])
            assert backend is not None  # a slot: checked before the step
            loaded.append(layout.forms[name].load(backend, slots, name, layout.compute))
        return loaded

    def save(
        self,
        backend: Backend,
        slots: dict[str, Array],
        name: str,
        value: Array,
        layout: Layout | None = None,
        noise: Noise | None = None,
    ) -> None:
        """Keep ``value``, the rule's new slot ``name`` (encoded into its stored form when
        ``layout`` gives one, stochastic rounding drawing from ``noise``): written into the
        slot's arrays where the library allows it (references into the state stay valid),
        else put in their place."""
        entries = {name: value} if layout is None else layout.forms[name].encode(backend, name, value, noise)
        for key, new in entries.items():
            old = slots[key]
            if backend.mutable and backend.writable(old):
                if new is not old:
                    backend.write(old, new)
            else:
                slots[key] = backend.as_array(new)

    def noise(self, keys: Keys) -> Noise:
        """Where stochastic rounding's random bits come from for the parameter at ``keys`` in
        this step: the seed, its path, the step (traced under ``jax.jit``), and its first
        element's index in the whole tensor."""
        assert self.precision is not None  # asked only for stored forms
        step = self.tree["step"]
        try:
            step = int(as_float(step))
        except Exception:  # traced: no number yet
            pass
        part = self.parts.get(keys)
        return Noise(self.precision.seed, _trees.dotted(keys), step, 0 if part is None else part.offset)

    def read(self, keys: Keys) -> dict[str, Array] | None:
        """The slots of the parameter at ``keys`` as the rule computes with them (a stored
        form read back into arrays of its compute dtype), or ``None`` when it has none."""
        slots = self.slots(keys)
        if not slots or keys not in self.parameters:
            return slots
        layout = self.layout(*self.parameters[keys], keys)
        if layout is None:
            return dict(slots)
        names = list(layout.forms)
        return dict(zip(names, self.load(slots, names, layout)))

    def encode_new(self, keys: Keys, param: Array, slots: dict[str, Array]) -> None:
        """Put the slots ``init_single`` just made for ``param`` (in its dtype) into their
        stored form, rounded to nearest (no step draws random bits yet)."""
        backend = backend_of(param)
        assert backend is not None  # a parameter
        layout = self.layout(tuple(backend.shape(param)), backend.dtype_name(param), keys)
        if layout is None:
            return
        for name, form in layout.forms.items():
            value = slots.pop(name)
            if backend.dtype_name(value) != layout.compute:
                value = backend.astype(value, layout.compute)
            slots.update(form.encode(backend, name, value, None))

    def hold_part(self, keys: Keys, whole: Shape, offset: int) -> None:
        """The parameter at ``keys`` is a part of a tensor of shape ``whole`` starting at
        element ``offset`` (a shard of rows): its slots are stored as the whole tensor's."""
        self.parts[keys] = Part(tuple(whole), int(offset))
        self.version = next_version()

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
        self,
        parameters: Tree,
        keys: Collection[Keys],
        init_single: Callable[[Array, dict[str, Array]], None],
        options: Mapping[Keys, Options] | None = None,
    ) -> None:
        """Mirror ``parameters`` into the state, with slots made by ``init_single`` for the
        parameters at ``keys`` (existing slots are kept: additive). ``options``: keys -> the
        options of its route; a parameter routed with some gets the slots of that view, made
        here from the rule (``init_single`` knows no route)."""
        tree, known, carried = self.tree, self.parameters, self.carried
        for leaf_keys, given in (options or {}).items():
            self.view(leaf_keys, given)

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
            if self.rule is not None and self.options.get(leaf_keys):
                self.zeros(param, slots, leaf_keys)
            else:
                init_single(param, slots)
            if self.precision is not None:
                self.encode_new(leaf_keys, param, slots)
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

    def view(self, keys: Keys, options: Options) -> None:
        """The parameter at ``keys`` is routed with ``options`` (its slots follow them)."""
        options = tuple(options)
        if self.options.get(keys, ()) == options:
            return
        if options:
            self.options[keys] = options
        else:
            self.options.pop(keys, None)
        self.version = next_version()

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
        self.options.pop(keys, None)
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
            dict(self.options),
        )

        def restore() -> None:
            self.tree, self.backend, self.checked, parameters, carried, options = saved
            self.parameters, self.carried, self.options = dict(parameters), dict(carried), dict(options)
            self.version = next_version()

        return restore

    # ------------------------------------------------------------------ checks
    def check_slots(
        self,
        owner: str,
        keys: Keys,
        param: Array,
        backend: Backend,
        slots: dict[str, Array],
        exact: bool,
        options: Options | None = None,
    ) -> None:
        """The slots a step is about to use must fit their parameter (its shape may have
        changed under the same path, or the state was set from outside) as the step routes
        it (``options``; else as recorded): same names (only those, when ``exact``),
        library, shape, dtype and device; no silent broadcasting; a slot stored in another
        form (``state_dtype``) has that form's entries."""
        if self.rule is None:
            return
        path = _trees.dotted(keys)
        shape = tuple(backend.shape(param))
        expected = self.expected(shape, backend.dtype_name(param), keys, options)
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
                    view = self.options.get(keys, ()) if options is None else options
                    if view:
                        problem += f" read with {', '.join(f'{k}={v}' for k, v in view)}"
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
            expected = self.expected(*known[keys], keys)
            if set(slots) != set(expected):
                raise ValueError(
                    f"{owner}.state: {path!r} has slots {sorted(slots)}, and {owner} keeps "
                    f"{sorted(expected)} (the state of another kind of optimizer, or of another state_dtype?)"
                )
            for slot, value in slots.items():
                if slot_problem(value, expected[slot]) is not None:
                    found = backend_of(value)
                    assert found is not None  # an array: checked above
                    got, want = f"{found.dtype_name(value)}{list(found.shape(value))}", expected[slot]
                    needs = "its state_dtype stores it as" if want.stored else "the parameter needs"
                    raise ValueError(
                        f"{owner}.state: slot {slot!r} of {path!r} is {got}; {needs} {want.dtype}{list(want.shape)}"
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
