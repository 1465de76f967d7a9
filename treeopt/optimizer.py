"""The ``Optimizer`` base class: state, step, schedules, init, apply_gradients, update.

How a step checks, commits and runs is :mod:`treeopt.engine`; this class holds the state,
the schedules and the hyper-parameters, and implements the engine's interface (the
"engine interface" section below) that ``MultiOptimizer`` overrides to route.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from treeopt import engine, kernels
from treeopt.backends import Backend, as_float, backend_of, default_backend, numpy_backend
from treeopt.engine import RESERVED, Book, Pair
from treeopt.errors import warn
from treeopt.kernels.compiled_step import CompiledStep
from treeopt.plan import Plan, build as build_plan
from treeopt.rules.base import Rule, check_coefficients, keyword_only
from treeopt.tree import is_container, tree_map
from treeopt.types import Array, Keys, Scalar, Schedule, Shape, State, Tree
from treeopt.values import hyper

if TYPE_CHECKING:
    from treeopt.multi import MultiOptimizer

__all__ = ["Optimizer", "Placement", "RESERVED", "step_lock"]


class Optimizer:
    """The base class of all optimizers.

    Subclasses either declare a :class:`~treeopt.rules.Rule` (the built-in optimizers), or
    implement ``init_single(parameter, state)`` and ``apply_single(gradient, parameter,
    state)`` as in ``mlx.optimizers``; the base class handles the tree, the step, the
    schedules and the state.

    Args:
        schedulers (dict, optional): hyper-parameter name -> schedule (a callable of the
            step), evaluated before every step.
    """

    #: the update math of a built-in optimizer
    rule: Rule | None = None
    #: hyper-parameters the rule reads: attributes, or state entries when scheduled; a class
    #: with a rule gets them from the rule's coefficient function
    hyperparameters: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "rule" in cls.__dict__ and cls.rule is not None and "hyperparameters" not in cls.__dict__:
            cls.hyperparameters = cls.rule.hyperparameters

    def __init__(self, schedulers: dict[str, Schedule] | None = None) -> None:
        self.book = Book()  # what the engine keeps beside the state (treeopt.engine.Book)
        scalars = default_backend()  # MLX's once MLX is loaded, for mx.compile(inputs=opt.state)
        self._state = {"step": scalars.scalar_array(0, "uint64")}
        for name in self.rule.running if self.rule is not None else ():
            self._state[name] = scalars.scalar_array(0.0, "float32")  # e.g. schedule-free's weight sum
        self._schedulers = dict(schedulers or {})
        self._compiled = None  # the step planned once (treeopt.kernels.compiled_step)

    def __repr__(self) -> str:
        hyper = ", ".join(f"{n}={getattr(self, n, None)!r}" for n in self.hyperparameters)
        return f"{type(self).__name__}({hyper})"

    # ------------------------------------------------------------------ state and scalars
    @property
    def state(self) -> State:
        """The live state: ``step``, ``learning_rate``, scheduled hyper-parameters, and one
        dict of slots per parameter, mirroring the parameter tree."""
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        self.check_state(state)
        self._state = state
        self.book.initialized = False  # the next step checks the new slots against the parameters
        self.book.backend = None
        self.book.version += 1

    def check_state(self, state: State) -> None:
        """Raise a ``TypeError`` or ``ValueError`` naming what is wrong if ``state`` cannot be
        this optimizer's state; nothing changes. Checked: the scalars (a step count >= 0, finite
        hyper-parameters), every slot is an array, and, for parameters this optimizer knows,
        the slots are this optimizer's (names), of the parameter's shape and dtype."""
        name = type(self).__name__
        if not isinstance(state, dict):
            raise TypeError(f"{name}.state must be a dict, got {type(state).__name__}")
        required = ["step"] + [k for k in ("learning_rate", *self._schedulers, *self._running()) if k in self._state]
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"{name}.state is missing {', '.join(map(repr, missing))}")
        step, backend = state["step"], backend_of(state["step"])
        if (
            backend is None
            or isinstance(step, bool)
            or tuple(backend.shape(step)) != ()
            or backend.dtype_name(step).startswith(("float", "bfloat", "complex", "bool"))
            or backend.name == "python"
            and not isinstance(step, int)
        ):
            raise TypeError(
                f"{name}.state['step'] must be a step count (an integer or a 0-d integer array), "
                f"got {type(step).__name__} {getattr(step, 'dtype', '')}".rstrip()
            )
        try:
            count = as_float(step)
        except Exception:  # traced (jax.jit): no value to check yet
            count = 0
        if count < 0:
            raise ValueError(f"{name}.state['step'] must be >= 0, got {count:.0f}")
        for key in ("learning_rate", *self._schedulers):
            if key in state:
                hyper(state[key], f"{name}.state[{key!r}]")
        known = self.book.parameters
        view = _StateView(state, ("step", "learning_rate", *self._schedulers, *self._running()))
        for keys in known:
            slots = engine.slots_at(view, keys)
            if slots is not None and not (
                isinstance(slots, dict)
                and all(
                    (found := backend_of(v)) is not None and not is_container(v) and found.name != "python"
                    for v in slots.values()
                )
            ):
                raise TypeError(
                    f"{name}.state: the state of {'.'.join(map(str, keys))!r} must be a dict of arrays "
                    f"(slot name -> array), got {type(slots).__name__} {str(slots)[:40]}"
                )
        for keys, slots in engine.slot_items(view):
            path = ".".join(map(str, keys))
            for slot, value in slots.items():
                found = backend_of(value)
                if found is None or found.name == "python":
                    raise TypeError(
                        f"{name}.state: slot {slot!r} of {path!r} is a {type(value).__name__}, not an array"
                    )
            if self.rule is None or not known:
                continue
            if keys not in known:
                raise ValueError(
                    f"{name}.state has slots for {path!r}, a parameter this optimizer does not hold "
                    f"(it holds {', '.join(sorted('.'.join(map(str, k)) for k in known))})"
                )
            shape, dtype = known[keys]
            expected = self.slot_shapes(_StateView.Shape(shape))
            if set(slots) != set(expected):
                raise ValueError(
                    f"{name}.state: {path!r} has slots {sorted(slots)}, and {name} keeps "
                    f"{sorted(expected)} (the state of another kind of optimizer?)"
                )
            for slot, value in slots.items():
                found = backend_of(value)
                assert found is not None  # checked above
                got = (tuple(found.shape(value)), found.dtype_name(value))
                if got != (tuple(expected[slot]), dtype):
                    raise ValueError(
                        f"{name}.state: slot {slot!r} of {path!r} is {got[1]}{list(got[0])}; the "
                        f"parameter needs {dtype}{list(expected[slot])}"
                    )

    @property
    def step(self) -> Array:
        """The number of steps taken, as a scalar array."""
        return self._state["step"]

    @property
    def learning_rate(self) -> Array:
        if "learning_rate" not in self._state:
            raise AttributeError(f"{type(self).__name__} has no learning_rate")
        return self._state["learning_rate"]

    @learning_rate.setter
    def learning_rate(self, value: float | Array) -> None:
        self._state["learning_rate"] = self._scalar(hyper(value, f"{type(self).__name__} learning_rate"))

    def _scalar(self, value, dtype="float32"):
        """A state scalar: an array of the state's library. Numbers (an integer learning
        rate too) become ``dtype``; float16, bfloat16 and float32 arrays keep their dtype."""
        backend = self.book.backend or backend_of(self._state["step"]) or numpy_backend
        owner = backend_of(value)
        if owner is None:
            raise TypeError(f"expected a number or an array, got {type(value).__name__}")
        if owner.name != "python" and owner.dtype_name(value) in ("float16", "bfloat16", "float32"):
            if owner is backend:  # astype: a JAX schedule's result may be weakly typed (retraces)
                return backend.astype(value, owner.dtype_name(value))
            dtype, value = owner.dtype_name(value), owner.to_numpy(value)
        elif owner.name != "python":
            value = owner.to_float(value)
        return backend.scalar_array(value, dtype)

    def _maybe_schedule(self, name: str, value: Scalar) -> None:
        """Put hyper-parameter ``name`` in the state, on a schedule if ``value`` is callable."""
        if callable(value):
            schedule, value = value, self._scheduled(name, value, self.step)
            self._schedulers[name] = schedule
        self._state[name] = self._scalar(hyper(value, f"{type(self).__name__} {name}"))

    def _scheduled(self, name, schedule, step):
        """``schedule(step)``, checked: one finite number."""
        what = f"{type(self).__name__} {name}: its schedule {getattr(schedule, '__name__', schedule)!r} at step "
        try:
            return hyper(schedule(step), what + f"{_step_text(step)} returned a value that")
        except (TypeError, ValueError) as error:
            if str(error).startswith(what):
                raise
            raise type(error)(f"{what}{_step_text(step)} raised {type(error).__name__}: {error}") from error

    @property
    def schedules(self) -> dict[str, Schedule]:
        """The schedules of the hyper-parameters: ``{name: callable of the step}``."""
        return dict(self._schedulers)

    def scale_learning_rate(self, multiplier: Schedule) -> None:
        """Multiply the learning rate (a number or a schedule) by ``multiplier``, a schedule
        of the step, from the next step on (``MultiOptimizer(lr_schedule=...)``)."""
        if "learning_rate" not in self._state:
            return
        schedule = self._schedulers.get("learning_rate")
        base = as_float(self._state["learning_rate"]) if schedule is None else schedule
        self._maybe_schedule("learning_rate", _Scaled(base, multiplier))

    def rule_hyperparameters(self) -> dict[str, Any]:
        """The hyper-parameters the rule reads: the state's values for scheduled ones."""
        return {n: self._value(n) for n in self.hyperparameters}

    def _value(self, name, evaluate=None):
        """A hyper-parameter's value: the state's when scheduled (or ``evaluate(schedule)``);
        a tuple such as ``betas`` may have scheduled members, kept as ``betas[i]``."""

        def one(key, value):
            if key in self._schedulers:
                return evaluate(self._schedulers[key]) if evaluate else self._state[key]
            return value

        value = getattr(self, name)
        if isinstance(value, tuple):
            return tuple(one(f"{name}[{i}]", v) for i, v in enumerate(value))
        return one(name, value)

    def _adopt(self, backend: Backend) -> None:
        """Settle the state's array library; state scalars move to it."""
        if self.book.backend is backend:
            return
        self.book.backend = backend
        for key, value in list(self._state.items()):
            owner = backend_of(value)
            if owner is not None and owner is not backend and not is_container(value):
                dtype = owner.dtype_name(value)
                self._state[key] = backend.scalar_array(owner.to_numpy(value), dtype)

    # ------------------------------------------------------------------ per-parameter hooks
    def init_single(self, parameter: Array, state: dict[str, Array]) -> None:
        """Fill ``state`` with zero slots for ``parameter``."""
        if self.rule is None:
            raise NotImplementedError(f"{type(self).__name__} must implement init_single")
        backend = backend_of(parameter)
        assert backend is not None  # the engine gives arrays
        for name, shape in self.slot_shapes(parameter).items():
            state[name] = backend.zeros(shape, parameter)
            if name in self.rule.copies_param:  # e.g. schedule-free's z starts at the parameter
                state[name] = state[name] + parameter

    def slot_shapes(self, parameter: Array) -> dict[str, Shape]:
        """The shape of each state slot of ``parameter``."""
        return self._rule().slot_shapes(tuple(parameter.shape), self.rule_hyperparameters())

    def apply_single(self, gradient: Array, parameter: Array, state: dict[str, Array]) -> Array:
        """One step for one parameter: returns the new parameter and updates ``state``."""
        if self.rule is None:
            raise NotImplementedError(f"{type(self).__name__} must implement apply_single")
        pair = engine.Pair((), gradient, parameter, backend_of(parameter))
        pair.slots = state
        engine.run_rule(self, [pair], in_place=False)
        return pair.result

    def _rule(self) -> Rule:
        if self.rule is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no rule: it must implement init_single and apply_single"
            )
        return self.rule

    @property
    def runs_rule(self) -> bool:
        """Whether the engine runs :attr:`rule` itself: a built-in optimizer, not a subclass
        with its own ``apply_single``."""
        return self.rule is not None and type(self).apply_single is Optimizer.apply_single

    # ------------------------------------------------------------------ init
    def init(self, parameters: Tree) -> None:
        """Create the state of every parameter in ``parameters`` that has none yet.

        Optional (the first step initialises lazily) and additive: existing slots are kept,
        so it is safe after loading a state.
        """
        with step_lock(self):
            engine.initialize(self, parameters)

    def assign_routes(self, parameters: Tree) -> dict[str, Optimizer | None]:
        """Decide and keep the route of every parameter in ``parameters`` (a flat or nested
        tree), creating no state: ``{path: stateful optimizer that will update it}``, ``None``
        for a frozen one. ZeRO-1 (:mod:`treeopt.distributed`) plans who owns what with it
        before any rank creates a slot."""
        pairs = [
            pair
            for pair in engine.collect(parameters, parameters, type(self).__name__, check_pairs=False)
            if pair.grad is not None
        ]
        backend = engine.settle_backend(self, pairs)
        owners = self.assign_owners(pairs)
        self.commit(backend)
        return {pair.path: owner for pair, owner in zip(pairs, owners)}

    def unsuited(self, path: str, parameter: Array) -> str | None:
        """Why this optimizer should not get ``parameter``, or ``None``. ``MultiOptimizer``
        checks it when it routes a parameter here (Muon: vectors, embeddings, heads)."""
        return None

    # ------------------------------------------------------------------ engine interface
    # Used by treeopt.engine, and by routing, plans, checkpoints, kernels and the
    # integrations; MultiOptimizer overrides the routing hooks. Not needed in training code.
    def assign_owners(self, pairs: list[Pair]) -> list[Optimizer | None]:
        """The optimizer that owns each :class:`~treeopt.engine.Pair` (``None``: frozen).
        ``MultiOptimizer`` routes; decisions for new paths wait for :meth:`commit`."""
        return [self] * len(pairs)

    def commit(self, backend: Backend | None) -> None:
        """Record the decisions of :meth:`assign_owners`, and settle the state's library."""
        if backend is not None:
            for optimizer in self.stateful():
                optimizer._adopt(backend)

    def stateful(self) -> list[Optimizer]:
        """The optimizers that hold state and take steps (``self``, or every group)."""
        return [self]

    def named_stateful(
        self, name: str | None = None, position: tuple[int, ...] = ()
    ) -> list[tuple[str, tuple[int, ...], Optimizer]]:
        """``(name, position, optimizer)`` of every optimizer that holds state."""
        return [(name or type(self).__name__, position, self)]

    def owner_of(self, keys: Keys) -> Optimizer | None:
        """The stateful optimizer that owns the parameter at ``keys`` (``None``: none)."""
        return self

    def placement(self, keys: Keys) -> Placement | None:
        """The :class:`Placement` of a parameter this optimizer routed, or ``None`` when it
        does not route (a single optimizer takes every parameter given to it)."""
        return None

    def routing_table(self) -> list[Placement]:
        """A :class:`Placement` for every parameter known, in the order first seen."""
        return [
            Placement(keys, self, "all parameters", (), (), shape, dtype)
            for keys, (shape, dtype) in self.book.parameters.items()
        ]

    def plan_warnings(self) -> list[str]:
        """What the plan should point out (``MultiOptimizer``: filters that match nothing)."""
        return []

    def prepare_step(
        self, pairs: list[Pair], owners: list[Optimizer | None]
    ) -> tuple[list[Pair], list[Optimizer | None], list[Optimizer], Callable[[], None] | None]:
        """Whole-model work between checking and committing (``MultiOptimizer``: clipping,
        the non-finite guard, accumulation). Returns the pairs and owners to update, the
        optimizers that take a step, and a function that commits the hook's own state."""
        return pairs, owners, self.stateful(), None

    def whole_model_state(self) -> dict[str, Any]:
        """The state entries kept for the whole model rather than by a stateful optimizer
        (``MultiOptimizer``: the last norm, skipped steps, accumulation); the live dict's
        entries, or ``{}``."""
        return {}

    def scalar_state(self) -> dict[str, Array]:
        """The state without any parameter's slots (``MultiOptimizer``: one per group)."""
        return {k: self._state[k] for k in self.scalar_names()}

    def scalar_names(self) -> list[str]:
        """The state entries that are not parameters: step, learning rate, schedules, and the
        rule's running values."""
        names = ("step", "learning_rate", *self._schedulers, *self._running())
        return [k for k in dict.fromkeys(names) if k in self._state]

    def _running(self):
        return self.rule.running if self.rule is not None else ()

    def routers(self, position: tuple[int, ...] = ()) -> list[tuple[tuple[int, ...], MultiOptimizer]]:
        """``(position, optimizer)`` of every optimizer in this one that routes parameters
        (each ``MultiOptimizer``, outermost first, at its position among the groups); ``[]``
        for an optimizer that takes every parameter given to it."""
        return []

    def declare_kinds(self, kinds: Mapping[str, str | Iterable[str]]) -> None:
        """Say what some parameters are, by path (``{"tok.weight": "embedding"}``). Only
        routing reads kinds (``MultiOptimizer``); an optimizer that does not route ignores them."""

    def note_change(self, what: str) -> None:
        """Record a change made from outside to the parameters this optimizer updates (the
        torch adapter resetting the state of a parameter replaced in the model). A
        ``MultiOptimizer`` logs it in ``changes`` with the step, beside its freezes and
        re-routes; an optimizer that does not route keeps no log."""

    _SNAPSHOT: tuple[str, ...] = ("book", "_compiled")

    def snapshot(self) -> Callable[[], None]:
        """A function that puts the optimizer back as it is now: the state's containers and
        the bookkeeping (arrays are not copied: what is snapshotted is what ``init`` and a
        load add, not what a step writes)."""
        saved = (tree_map(lambda x: x, self._state), {k: _copy(getattr(self, k)) for k in self._SNAPSHOT})

        def restore() -> None:
            self._state = saved[0]
            for key, value in saved[1].items():
                setattr(self, key, value)

        return restore

    def scheduled_values(self) -> dict[str, Array]:
        """Every schedule evaluated at the current step and checked (one finite number), as
        state scalars: computed before a step commits, so a schedule that fails (raises,
        returns a vector, a string or NaN) fails before anything changes."""
        step = self._state["step"]
        return {name: self._scheduled(name, schedule, step) for name, schedule in self._schedulers.items()}

    def advance(self, values: dict[str, Array] | None = None) -> None:
        """Count the step, with the schedules' ``values`` (:meth:`scheduled_values`), made
        state scalars of the state's library (settled by now); then advance the rule's running
        values (once per step, before any coefficient is computed)."""
        values = self.scheduled_values() if values is None else values
        self._state.update({name: self._scalar(value) for name, value in values.items()})
        self._state["step"] = self._state["step"] + 1
        if self.rule is not None and self.rule.advance is not None:
            backend = self.book.backend or backend_of(self._state["step"]) or numpy_backend
            settings = self.rule_hyperparameters()
            running = self.rule.advance(
                self._state.get("learning_rate"),
                backend.astype(self._state["step"], "float32"),
                **{n: self._state[n] for n in self.rule.running},
                **{n: settings[n] for n in keyword_only(self.rule.advance) if n in settings},
            )
            for name, value in running.items():
                self._state[name] = self._scalar(value)

    def check_rule(self) -> None:
        """Compute the coefficients once, in the state's own library, so that a rule whose
        coefficients do not fit its update fails before a step changes anything."""
        rule = self._rule()
        state_backend = backend_of(self._state["step"])
        assert state_backend is not None  # the state setter checks the step
        with state_backend.quiet():
            step = state_backend.astype(self._state["step"], "float32")
            running = {n: self._state[n] for n in rule.running}
            values = rule.coefficients(self._state.get("learning_rate"), step, **self.rule_hyperparameters(), **running)
        check_coefficients(rule, values)

    def coefficients(self, like: Array, backend: Backend) -> dict[str, Any]:
        """The rule's coefficients for this step, in ``like``'s dtype."""
        lr = self._state.get("learning_rate")
        if lr is not None:
            lr = backend.cast(lr, like)
        # Step-dependent scalars are computed in float32, as MLX computes them.
        step = backend.astype(self._state["step"], "float32")
        rule = self._rule()
        running = {n: self._state[n] for n in rule.running}
        values = rule.coefficients(lr, step, **self.rule_hyperparameters(), **running)
        check_coefficients(rule, values)
        return {
            k: v if v is None or isinstance(v, (bool, int, str)) else backend.cast(v, like) for k, v in values.items()
        }

    def plan(self, params: Tree | None = None) -> Plan:
        """The routing plan (a :class:`treeopt.plan.Plan`): for every parameter, its optimizer
        and why, shape, dtype, size, state bytes and the hyper-parameters of the next step.

        With ``params``, new parameters are routed and initialised first, exactly as a step
        would: the plan shown is the plan used.
        """
        if params is not None:
            self.init(params)
        return build_plan(self)

    def current_hyperparameters(self) -> dict[str, Any]:
        """The hyper-parameters the next step will use, as Python values."""
        step = self._state["step"]
        values = {}
        if "learning_rate" in self._state:
            lr = (
                self._schedulers["learning_rate"](step)
                if "learning_rate" in self._schedulers
                else self._state["learning_rate"]
            )
            values["learning_rate"] = as_float(lr)

        def plain(value):
            if isinstance(value, tuple):
                return tuple(plain(v) for v in value)
            return value if isinstance(value, (bool, str, int, type(None))) else as_float(value)

        for name in self.hyperparameters:
            values[name] = plain(self._value(name, evaluate=lambda schedule: schedule(step)))
        for name in self._running():
            values[name] = as_float(self._state[name])
        return values

    # ------------------------------------------------------------------ the step
    def apply_gradients(self, gradients: Tree, parameters: Tree) -> Tree:
        """Apply one step and return the new parameters, with the structure of
        ``gradients``. ``parameters`` may hold more entries than ``gradients``; a ``None``
        gradient leaves its parameter (and its state) as they are. Inputs are not changed.
        """
        with step_lock(self):
            return engine.step(self, gradients, parameters, in_place=False)[0]

    def update(self, model: Tree, gradients: Tree) -> None:
        """Apply one step to ``model`` (a tree of arrays, or an ``mlx.nn.Module``).

        NumPy and torch arrays are written in place, so every reference to them sees the new
        values; immutable arrays (JAX, MLX) are replaced inside the model's containers. When
        the tree keeps its structure, later steps reuse the plan of the first one (see
        :mod:`treeopt.kernels.compiled_step`).
        """
        with step_lock(self):  # one step at a time per optimizer (see docs/reliability.md, threads)
            compiled = self._compiled
            if compiled is not None and compiled.run(gradients, model):
                return
            new, pairs, active, stepping = engine.step(self, gradients, model, in_place=True)
            self._compiled = self._compile(gradients, model, pairs, active, stepping)
            engine.write_back(model, new, pairs)

    def _compile(self, gradients, model, pairs, active, stepping):
        """The plan of the step just taken, for the next ``update``; ``None`` when it cannot be
        reused (immutable arrays, whole-model options, a custom ``apply_single``...)."""
        options = getattr(self, "whole_model", None)
        if not kernels.enabled or (options is not None and options.active):
            return None
        if not active or not active[0].backend.mutable:
            return None
        try:
            return CompiledStep.build(self, gradients, model, pairs, active, stepping)
        except Exception as error:  # the step is done: a fast path that cannot be built is only slower
            warn(
                f"treeopt: no compiled step for {type(self).__name__} ({type(error).__name__}: {error}); "
                "later steps take the reference path",
                RuntimeWarning,
            )
            return None


class Placement(NamedTuple):
    """Where a parameter goes and why, as plans and checkpoints show it."""

    keys: Keys
    #: the stateful optimizer that owns it (``None``: frozen)
    owner: Optimizer | None
    #: why: ``"filters[0] (is_hidden_matrix)"``, ``"fallback"``, ``"rerouted"``, ``"frozen"``...
    reason: str
    #: other filters that accept it (the first one won)
    also: tuple[str, ...]
    #: guard findings
    notes: tuple[str, ...]
    shape: Shape
    dtype: str


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> the lock its steps take
_LOCKS_GUARD = threading.Lock()


def step_lock(optimizer: Optimizer) -> threading.RLock:
    """The re-entrant lock of ``optimizer``: concurrent steps (and inits) of one optimizer
    run one after the other, so routes decided in one cannot be lost by another. A
    checkpoint's save holds it too, so it never writes the state of half a step."""
    lock = _LOCKS.get(optimizer)
    if lock is None:
        with _LOCKS_GUARD:
            lock = _LOCKS.setdefault(optimizer, threading.RLock())
    return lock


class _StateView:
    """A candidate state dict, read with the engine's layout functions before it is adopted."""

    def __init__(self, state: State, scalars: Sequence[str]) -> None:
        self.state, self._scalars = state, scalars

    def scalar_names(self):
        return [k for k in self._scalars if k in self.state]

    class Shape:
        def __init__(self, shape: Sequence[int]) -> None:
            self.shape, self.ndim = tuple(shape), len(shape)


def _step_text(step):
    try:
        return str(int(as_float(step)))
    except Exception:  # a traced step (jax.jit): no number yet
        return "(traced)"


def _copy(value):
    if isinstance(value, Book):
        return value.copy()
    return dict(value) if isinstance(value, dict) else set(value) if isinstance(value, set) else value


class _Scaled:
    """A learning rate (a number or a schedule) times a shared multiplier schedule."""

    def __init__(self, base: Scalar, multiplier: Schedule) -> None:
        self.base, self.multiplier = base, multiplier

    def __call__(self, step: Array) -> Array:
        base = self.base(step) if callable(self.base) else self.base
        return base * self.multiplier(step)

    def __repr__(self) -> str:
        return f"{self.base!r} x {getattr(self.multiplier, '__name__', 'schedule')}"
