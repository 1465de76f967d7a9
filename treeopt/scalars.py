"""An optimizer's scalars: the step, the learning rate, scheduled hyper-parameters and the
rule's running values, with one reader of their current values and the rule's coefficients.

The values live in the optimizer's state dict (MLX's layout: ``state["step"]``,
``state["learning_rate"]``...), held by its :class:`~treeopt.state.SlotStore`, as arrays of
the state's library, so ``mx.compile`` and ``jax.jit`` trace them and a new learning rate
recompiles nothing. The hyper-parameters as set (numbers, flags, schedules) are ``settings``,
a dict the optimizer writes whenever one of its hyper-parameter attributes is set (as in MLX,
they stay readable as attributes); the slot store reads the same dict for slot shapes, and
merges a route's per-parameter options on top (:meth:`treeopt.state.SlotStore.hyper`).

``version`` changes when a setting changes or a schedule is added (what a compiled step was
planned for), not when a value is written (a new learning rate, a step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from treeopt.backends import Backend, as_float, backend_of, default_backend, numpy_backend
from treeopt.rules.base import Rule, check_coefficients, keyword_only
from treeopt.state import CONTEXT, SlotStore, next_version
from treeopt.types import Array, Options, Scalar, Schedule, State
from treeopt.values import hyper

__all__ = ["Scalars", "context"]


@contextlib.contextmanager
def context(**values: Any) -> Iterator[None]:
    """Within the block, settings left ``None`` that take a value from their context
    (``Scalars.defaults``) read ``values``; blocks nest, and each thread (each asyncio task)
    has its own."""
    token = CONTEXT.set({**CONTEXT.get(), **values})
    try:
        yield
    finally:
        CONTEXT.reset(token)


class Scalars:
    """The scalars of one optimizer.

    Args:
        store: the optimizer's slot store, whose dict holds the values.
        rule: the optimizer's rule (``None``: an optimizer written with ``init_single`` and
            ``apply_single`` only).
        names: the hyper-parameters the rule reads, in its order.
        owner: the optimizer's name, for messages.
    """

    def __init__(self, store: SlotStore, rule: Rule | None, names: Sequence[str], owner: str) -> None:
        self.store, self.rule, self.owner = store, rule, owner
        #: the hyper-parameters as set: numbers, flags, schedules (shared with the store)
        self.settings = store.settings
        self.hyperparameter_names = tuple(names)
        #: settings that, left ``None``, take their value from the code around the step
        #: (:func:`context`), else this default (Muon's layout: flax's under treeopt.jax);
        #: the store's, which reads them for slot shapes
        self.defaults = store.defaults
        #: the schedules of hyper-parameters: ``{name: callable of the step}``
        self.schedules: dict[str, Schedule] = {}
        self.running: tuple[str, ...] = rule.running if rule is not None else ()
        self.version = next_version()
        backend = default_backend()  # MLX's once MLX is loaded, for mx.compile(inputs=opt.state)
        store.tree["step"] = backend.scalar_array(0, "uint64")
        for name in self.running:  # e.g. schedule-free's weight sum
            store.tree[name] = backend.scalar_array(0.0, "float32")
            store.reserved.add(name)

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        """The entries of the state that are not parameters: step, learning rate, schedules,
        and the rule's running values."""
        tree = self.store.tree
        return [k for k in dict.fromkeys(("step", "learning_rate", *self.schedules, *self.running)) if k in tree]

    def value(self, name: str) -> Array:
        """The current value of scalar ``name``, as the state holds it."""
        return self.store.tree[name]

    def hyperparameters(self, options: Options = ()) -> dict[str, Any]:
        """The hyper-parameters the rule reads: the state's values for scheduled ones (a tuple
        such as ``betas`` may have scheduled members, kept as ``betas[i]``), with a route's
        ``options`` for one parameter on top (merged by :meth:`SlotStore.hyper`, as its
        slots are)."""
        values, given = self.store.hyper(options=options), dict(options)
        return {
            name: values[name] if name in given else self._resolve(name, values[name])
            for name in self.hyperparameter_names
        }

    def _resolve(self, name: str, value: Any, evaluate: Callable[[Schedule], Any] | None = None) -> Any:
        def one(key: str, value: Any) -> Any:
            if key in self.schedules:
                return evaluate(self.schedules[key]) if evaluate else self.store.tree[key]
            return value

        if isinstance(value, tuple):
            return tuple(one(f"{name}[{i}]", v) for i, v in enumerate(value))
        return one(name, value)

    def current(self) -> dict[str, Any]:
        """The hyper-parameters the next step will use, as Python values."""
        tree, step = self.store.tree, self.store.tree["step"]
        values: dict[str, Any] = {}
        if "learning_rate" in tree:
            schedule = self.schedules.get("learning_rate")
            values["learning_rate"] = as_float(schedule(step) if schedule is not None else tree["learning_rate"])

        def plain(value: Any) -> Any:
            if isinstance(value, tuple):
                return tuple(plain(v) for v in value)
            return value if isinstance(value, (bool, str, int, type(None))) else as_float(value)

        for name in self.hyperparameter_names:
            setting = self.store.setting(name)
            values[name] = plain(self._resolve(name, setting, evaluate=lambda schedule: schedule(step)))
        for name in self.running:
            values[name] = as_float(tree[name])
        return values

    # ------------------------------------------------------------------ writing
    def array(self, value: Scalar, dtype: str = "float32") -> Array:
        """A state scalar: an array of the state's library. Numbers (an integer learning
        rate too) become ``dtype``; float16, bfloat16 and float32 arrays keep their dtype."""
        backend = self.store.backend or backend_of(self.store.tree["step"]) or numpy_backend
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

    def set(self, name: str, value: Scalar) -> None:
        """Write scalar ``name`` (checked: one finite number)."""
        self.store.tree[name] = self.array(hyper(value, f"{self.owner} {name}"))

    def schedule(self, name: str, value: Scalar) -> None:
        """Put hyper-parameter ``name`` in the state, on a schedule if ``value`` is callable."""
        if callable(value):
            schedule, value = value, self._evaluate(name, value, self.store.tree["step"])
            self.schedules[name] = schedule
            self.store.reserved.add(name)
            self.version = next_version()
        self.set(name, value)

    def scale_learning_rate(self, multiplier: Schedule) -> None:
        """Multiply the learning rate (a number or a schedule) by ``multiplier``, a schedule
        of the step, from the next step on."""
        if "learning_rate" not in self.store.tree:
            return
        schedule = self.schedules.get("learning_rate")
        base = as_float(self.store.tree["learning_rate"]) if schedule is None else schedule
        self.schedule("learning_rate", _Scaled(base, multiplier))

    def setting(self, name: str, value: Any) -> None:
        """Record hyper-parameter ``name`` as set (a compiled step re-checks its switches)."""
        self.settings[name] = value
        self.version = next_version()

    # ------------------------------------------------------------------ a step
    def due(self) -> dict[str, Array]:
        """Every schedule evaluated at the current step and checked (one finite number):
        computed before a step commits, so a schedule that fails (raises, returns a vector, a
        string or NaN) fails before anything changes."""
        step = self.store.tree["step"]
        return {name: self._evaluate(name, schedule, step) for name, schedule in self.schedules.items()}

    def _evaluate(self, name: str, schedule: Schedule, step: Array) -> Scalar:
        """``schedule(step)``, checked: one finite number."""
        what = f"{self.owner} {name}: its schedule {getattr(schedule, '__name__', schedule)!r} at step "
        try:
            return hyper(schedule(step), what + f"{_step_text(step)} returned a value that")
        except (TypeError, ValueError) as error:
            if str(error).startswith(what):
                raise
            raise type(error)(f"{what}{_step_text(step)} raised {type(error).__name__}: {error}") from error

    def advance(self, due: dict[str, Array]) -> None:
        """Count the step, with the schedules' values ``due`` (:meth:`due`) made state
        scalars of the state's library (settled by now); then advance the rule's running
        values (once per step, before any coefficient is computed)."""
        tree = self.store.tree
        tree.update({name: self.array(value) for name, value in due.items()})
        tree["step"] = tree["step"] + 1
        rule = self.rule
        if rule is not None and rule.advance is not None:
            backend = self.store.backend or backend_of(tree["step"]) or numpy_backend
            settings = self.hyperparameters()
            running = rule.advance(
                tree.get("learning_rate"),
                backend.astype(tree["step"], "float32"),
                **{n: tree[n] for n in rule.running},
                **{n: settings[n] for n in keyword_only(rule.advance) if n in settings},
            )
            for name, value in running.items():
                tree[name] = self.array(value)

    def check_rule(self) -> None:
        """Compute the coefficients once, in the state's own library, so that a rule whose
        coefficients do not fit its update fails before a step changes anything."""
        rule, tree = self._rule(), self.store.tree
        backend = backend_of(tree["step"])
        assert backend is not None  # the state setter checks the step
        with backend.quiet():
            step = backend.astype(tree["step"], "float32")
            running = {n: tree[n] for n in rule.running}
            values = rule.coefficients(tree.get("learning_rate"), step, **self.hyperparameters(), **running)
        check_coefficients(rule, values)

    def coefficients(self, like: Array, backend: Backend, options: Options = ()) -> dict[str, Any]:
        """The rule's coefficients for this step, in ``like``'s dtype (arrays of ``like``'s
        library: a new value is a new number, never a new program), for parameters routed
        with ``options``."""
        tree = self.store.tree
        lr = tree.get("learning_rate")
        if lr is not None:
            lr = backend.cast(lr, like)
        # Step-dependent scalars are computed in float32, as MLX computes them.
        step = backend.astype(tree["step"], "float32")
        rule = self._rule()
        running = {n: tree[n] for n in rule.running}
        values = rule.coefficients(lr, step, **self.hyperparameters(options), **running)
        check_coefficients(rule, values)
        return {
            k: v if v is None or isinstance(v, (bool, int, str)) else backend.cast(v, like) for k, v in values.items()
        }

    def _rule(self) -> Rule:
        if self.rule is None:
            raise NotImplementedError(f"{self.owner} has no rule: it must implement init_single and apply_single")
        return self.rule

    # ------------------------------------------------------------------ checks
    def check(self, tree: State) -> None:
        """Raise a ``TypeError`` or ``ValueError`` naming what is wrong if the scalars of
        ``tree`` cannot be these: every scalar there, a step count >= 0, finite
        hyper-parameters; nothing changes."""
        name = self.owner
        if not isinstance(tree, dict):
            raise TypeError(f"{name}.state must be a dict, got {type(tree).__name__}")
        missing = [k for k in self.names() if k not in tree]
        if missing:
            raise ValueError(f"{name}.state is missing {', '.join(map(repr, missing))}")
        step, backend = tree["step"], backend_of(tree["step"])
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
        for key in ("learning_rate", *self.schedules):
            if key in tree:
                hyper(tree[key], f"{name}.state[{key!r}]")


def _step_text(step: Array) -> str:
    try:
        return str(int(as_float(step)))
    except Exception:  # a traced step (jax.jit): no number yet
        return "(traced)"


class _Scaled:
    """A learning rate (a number or a schedule) times a shared multiplier schedule."""

    def __init__(self, base: Scalar, multiplier: Schedule) -> None:
        self.base, self.multiplier = base, multiplier

    def __call__(self, step: Array) -> Array:
        base = self.base(step) if callable(self.base) else self.base
        return base * self.multiplier(step)

    def __repr__(self) -> str:
        return f"{self.base!r} x {getattr(self.multiplier, '__name__', 'schedule')}"
