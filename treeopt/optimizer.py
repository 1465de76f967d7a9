"""The ``Optimizer`` base class: MLX's API over three parts and the engine that drives them.

An optimizer is a rule (its math, :mod:`treeopt.rules`) and its hyper-parameters, plus:

- ``store``, a :class:`~treeopt.state.SlotStore`: the state dict in MLX's layout;
- ``scalars``, a :class:`~treeopt.scalars.Scalars`: step, learning rate, schedules;
- ``router``: who updates each parameter (:mod:`treeopt.routing`; here, the optimizer itself).

``update`` and ``apply_gradients`` hand these to :func:`treeopt.engine.step`; later
``update`` calls on a tree of the same structure run the step planned once
(:mod:`treeopt.kernels.compiled_step`).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from treeopt import engine, kernels
from treeopt.errors import warn
from treeopt.kernels.compiled_step import CompiledStep
from treeopt.plan import Plan, build as build_plan
from treeopt.routing import Direct, Member, Router
from treeopt.rules.base import Rule
from treeopt.scalars import Scalars
from treeopt.state import SlotStore
from treeopt.types import Array, Scalar, Schedule, State, Tree
from treeopt.whole_model import WholeModel

__all__ = ["Optimizer", "step_lock"]


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
    #: whether the engine runs :attr:`rule` itself: a built-in optimizer, not a subclass with
    #: its own ``apply_single``
    runs_rule: bool = False
    #: the state dict and what is known about it (a ``MultiOptimizer``'s groups have theirs)
    store: SlotStore
    #: step, learning rate, schedules, running values
    scalars: Scalars
    #: who updates each parameter (:class:`~treeopt.routing.Direct`: this optimizer)
    router: Direct | Router
    _hook: WholeModel | None = None  # whole-model work of a MultiOptimizer
    _compiled: CompiledStep | None = None  # the step planned once

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "rule" in cls.__dict__ and cls.rule is not None and "hyperparameters" not in cls.__dict__:
            cls.hyperparameters = cls.rule.hyperparameters

    def __init__(self, schedulers: dict[str, Schedule] | None = None) -> None:
        self.store = SlotStore(self.rule)
        self.scalars = Scalars(self.store, self.rule, self.hyperparameters, type(self).__name__)
        for name in self.hyperparameters:  # set before this constructor ran, or on the class
            if hasattr(self, name):
                self.scalars.settings[name] = getattr(self, name)
        for name, schedule in (schedulers or {}).items():
            self.scalars.schedules[name] = schedule
            self.store.reserved.add(name)
        self.router = Direct(self)
        self.runs_rule = self.rule is not None and type(self).apply_single is Optimizer.apply_single

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if "scalars" in self.__dict__ and name in self.hyperparameters:
            self.scalars.setting(name, value)  # what the rule reads: the scalars' copy

    def __repr__(self) -> str:
        hyper = ", ".join(f"{n}={getattr(self, n, None)!r}" for n in self.hyperparameters)
        return f"{type(self).__name__}({hyper})"

    def _maybe_schedule(self, name: str, value: Scalar) -> None:
        """Put hyper-parameter ``name`` in the state, on a schedule if ``value`` is callable
        (as ``mlx.optimizers`` subclasses call it)."""
        self.scalars.schedule(name, value)

    # ------------------------------------------------------------------ state and scalars
    @property
    def state(self) -> State:
        """The live state: ``step``, ``learning_rate``, scheduled hyper-parameters, and one
        dict of slots per parameter, mirroring the parameter tree."""
        return self.store.tree

    @state.setter
    def state(self, state: State) -> None:
        """Checked before it is adopted: the scalars (a step count >= 0, finite
        hyper-parameters), every slot an array, and, for parameters this optimizer knows, the
        slots its own, of the parameter's shape and dtype; a ``TypeError`` or ``ValueError``
        names what is wrong, and nothing changes."""
        self._check_state(state)
        self.store.replace(state)

    def _check_state(self, state: State) -> None:
        self.scalars.check(state)
        self.store.check_tree(state, type(self).__name__)

    @property
    def step(self) -> Array:
        """The number of steps taken, as a scalar array."""
        return self.store.tree["step"]

    @property
    def learning_rate(self) -> Array:
        if "learning_rate" not in self.store.tree:
            raise AttributeError(f"{type(self).__name__} has no learning_rate")
        return self.store.tree["learning_rate"]

    @learning_rate.setter
    def learning_rate(self, value: float | Array) -> None:
        self.scalars.set("learning_rate", value)

    def groups(self) -> list[Member]:
        """``(name, position, optimizer)`` of every optimizer that holds state and steps:
        this one, or each group of a ``MultiOptimizer`` (named by its names, positioned by
        its nesting)."""
        return self.router.groups()

    # ------------------------------------------------------------------ per-parameter hooks
    def init_single(self, parameter: Array, state: dict[str, Array]) -> None:
        """Fill ``state`` with zero slots for ``parameter``."""
        if self.rule is None:
            raise NotImplementedError(f"{type(self).__name__} must implement init_single")
        self.store.zeros(parameter, state)

    def apply_single(self, gradient: Array, parameter: Array, state: dict[str, Array]) -> Array:
        """One step for one parameter: returns the new parameter and updates ``state``."""
        if self.rule is None:
            raise NotImplementedError(f"{type(self).__name__} must implement apply_single")
        return engine.run_one(self, gradient, parameter, state)

    def unsuited(self, path: str, parameter: Array) -> str | None:
        """Why this optimizer should not get ``parameter``, or ``None``. A ``MultiOptimizer``
        checks it when it routes a parameter here (Muon: vectors, embeddings, heads)."""
        return None

    # ------------------------------------------------------------------ init, plan
    def init(self, parameters: Tree) -> None:
        """Create the state of every parameter in ``parameters`` that has none yet.

        Optional (the first step initialises lazily) and additive: existing slots are kept,
        so it is safe after loading a state.
        """
        with step_lock(self):
            self.router.learn(parameters)
            engine.initialize(self.router, parameters, type(self).__name__)

    def plan(self, params: Tree | None = None) -> Plan:
        """The routing plan (a :class:`treeopt.plan.Plan`): for every parameter, its optimizer
        and why, shape, dtype, size, state bytes and the hyper-parameters of the next step.

        With ``params``, new parameters are routed and initialised first, exactly as a step
        would: the plan shown is the plan used.
        """
        if params is not None:
            self.init(params)
        return build_plan(self.groups(), self.router)

    # ------------------------------------------------------------------ the step
    def apply_gradients(self, gradients: Tree, parameters: Tree) -> Tree:
        """Apply one step and return the new parameters, with the structure of
        ``gradients``. ``parameters`` may hold more entries than ``gradients``; a ``None``
        gradient leaves its parameter (and its state) as they are. Inputs are not changed.
        """
        with step_lock(self):
            self.router.learn(parameters)
            return engine.step(self.router, self._hook, gradients, parameters, False, type(self).__name__).tree

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
            self.router.learn(model)  # an mlx.nn.Module says what its layers are
            taken = engine.step(self.router, self._hook, gradients, model, True, type(self).__name__)
            self._compiled = self._compile(gradients, model, taken)
            engine.write_back(model, taken.tree, taken.pairs)

    def _compile(self, gradients: Tree, model: Tree, taken: engine.Taken) -> CompiledStep | None:
        """The plan of the step just taken, for the next ``update``; ``None`` when it cannot be
        reused (immutable arrays, whole-model options, a custom ``apply_single``...)."""
        if not kernels.enabled or (self._hook is not None and self._hook.active):
            return None
        if not taken.active or not taken.active[0].backend.mutable:
            return None
        try:
            return CompiledStep.build(self.router, gradients, model, taken)
        except Exception as error:  # the step is done: a fast path that cannot be built is only slower
            warn(
                f"treeopt: no compiled step for {type(self).__name__} ({type(error).__name__}: {error}); "
                "later steps take the reference path",
                RuntimeWarning,
            )
            return None


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
