"""``MultiOptimizer``: each parameter goes to the first optimizer whose filter accepts it.

The route of a path is decided once, the first time the path is seen, from the parameter
(not the gradient), and reused on every later step: filters are not called again for known
paths, so a filter that looks at values or dtypes cannot move a parameter away from its
state. The caller's tree structure is kept exactly, whatever the number of optimizers.

A ``MultiOptimizer`` is its children, a :class:`~treeopt.routing.Router` over them and the
whole-model options (:class:`~treeopt.whole_model.WholeModel`, the engine's step hook).
Beyond ``mlx.optimizers``: routing checks (unmatched parameters, filters that match
nothing, overlaps, optimizers' own guards), frozen parameters, one learning-rate schedule
for every group, whole-model operations (global clipping, a non-finite guard,
accumulation with per-group frequencies), changes during training (freeze, unfreeze,
reroute) and :meth:`plan`, which shows all of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from treeopt.backends import as_float
from treeopt.optimizer import Optimizer
from treeopt.routing import CHOICES, Route, Router, RoutingError, RoutingWarning
from treeopt.scalars import Scalars
from treeopt.state import SlotStore
from treeopt.types import Array, Filter, Schedule
from treeopt.values import hyper
from treeopt.whole_model import WholeModel

__all__ = ["MultiOptimizer", "Route", "RoutingError", "RoutingWarning"]


def _default_names(optimizers: Sequence[Optimizer]) -> list[str]:
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

    router: Router

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
        optimizers, filters = list(optimizers), list(filters)
        if len(filters) != len(optimizers) - 1:
            raise ValueError(f"Given {len(filters)} filters but {len(optimizers) - 1} needed.")
        for i, child in enumerate(optimizers):
            if not isinstance(child, Optimizer):
                raise TypeError(f"MultiOptimizer: optimizers[{i}] is a {type(child).__name__}, not an Optimizer")
        seen: dict = {}
        for i, child in enumerate(optimizers):
            for member in child.groups():
                if id(member.group) in seen:
                    raise ValueError(
                        f"MultiOptimizer: optimizers[{i}] is (or holds) the same {type(member.group).__name__} "
                        f"instance as optimizers[{seen[id(member.group)]}]; each group needs its own optimizer "
                        "(its own state and step)"
                    )
                seen[id(member.group)] = i
        for i, fn in enumerate(filters):
            if not callable(fn):
                raise TypeError(f"MultiOptimizer: filters[{i}] is a {type(fn).__name__}, not a callable")
        if names is not None and (len(names) != len(optimizers) or len(set(names)) != len(names)):
            raise ValueError(f"MultiOptimizer: names must be {len(optimizers)} distinct strings, got {names!r}")
        for option, value in (("on_unmatched", on_unmatched), ("guards", guards)):
            if value not in CHOICES[option]:
                raise ValueError(f"MultiOptimizer: {option} must be one of {CHOICES[option]}, got {value!r}")
        self.optimizers = optimizers
        self.router = Router(
            [child.router for child in optimizers],
            filters,
            list(names) if names is not None else _default_names(optimizers),
            frozen,
            on_unmatched,
            guards,
        )
        self.whole_model = self._hook = WholeModel(
            max_grad_norm,
            skip_nonfinite,
            accumulate,
            [[member.group for member in child.groups()] for child in optimizers],
        )
        self.whole_model.state["states"] = [o.state for o in optimizers]
        self.lr_schedule: Schedule | None = None
        if lr_schedule is not None:
            if not callable(lr_schedule):
                raise TypeError("MultiOptimizer: lr_schedule must be a callable of the step (a multiplier)")
            self.lr_schedule = lr_schedule
            for member in self.groups():
                member.group.scalars.scale_learning_rate(lr_schedule)

    def __repr__(self) -> str:
        return f"MultiOptimizer([{', '.join(map(repr, self.optimizers))}])"

    @property
    def store(self) -> SlotStore:  # type: ignore[override]  # its groups have stores, it has none
        raise AttributeError("a MultiOptimizer keeps no slots of its own: each of its groups() has a store")

    @property
    def scalars(self) -> Scalars:  # type: ignore[override]  # its groups have scalars, it has none
        raise AttributeError("a MultiOptimizer keeps no scalars of its own: each of its groups() has scalars")

    # ------------------------------------------------------------------ routing
    @property
    def filters(self) -> list[Filter]:
        """The filters, the fallback's (which accepts everything) last."""
        return self.router.filters

    @property
    def names(self) -> list[str]:
        """The name of each optimizer, as plans and checkpoints show them."""
        return self.router.names

    @property
    def changes(self) -> list[str]:
        """Freezes, unfreezes and re-routes, in order (``"step 3: froze ..."``)."""
        return self.router.changes

    def declare_kinds(self, kinds: Mapping[str, str | Iterable[str]]) -> None:
        """Say what some parameters are, by path: ``{"tok.weight": "embedding"}`` (a kind or
        several). Filters see it through :func:`treeopt.filters.kinds_of` (``is_embedding``,
        ``is_head``, ``is_norm``, ``kind(...)``), and so do optimizers' routing guards. It
        applies to paths routed from now on; framework integrations call it."""
        self.router.declare_kinds(kinds)

    def route(self, path: str | tuple) -> int | None:
        """The index of the optimizer that owns ``path`` (a dotted path or keys tuple), or
        ``None`` for a path not seen yet or frozen."""
        keys = self.router.keys_of(path)
        return None if keys is None else self.router.index(keys)

    def routes(self) -> dict[tuple, Route]:
        """Every known path's :class:`Route` (keys -> record), in the order first seen. A copy:
        the records are immutable, so nothing read here changes the routing. Checkpoints save
        from it what the filters cannot redo (freezes, unfreezes, re-routes)."""
        return self.router.routes()

    def overlaps(self) -> dict[str, list[int]]:
        """``{path: [every filter index that accepts it]}`` for parameters accepted by more
        than one filter (the first still wins)."""
        return self.router.overlaps()

    # ------------------------------------------------------------------ changes during training
    def freeze(self, which: str | tuple | Sequence | Filter) -> list[str]:
        """Stop updating the selected parameters (a path, paths, or a filter). Their state is
        kept, so :meth:`unfreeze` resumes where they stopped."""
        return self.router.freeze(which)

    def unfreeze(self, which: str | tuple | Sequence | Filter) -> list[str]:
        """Update the selected frozen parameters again (routed by the filters if they never
        had a route)."""
        return self.router.unfreeze(which)

    def reroute(self, which: str | tuple | Sequence | Filter, to: int | str, state: str = "reset") -> list[str]:
        """Move the selected parameters to optimizer ``to`` (an index or a name).

        Args:
            state: ``"reset"``: the new optimizer starts from zero slots; ``"carry"``: slots
                that both optimizers have (e.g. AdamW's ``m`` and ``v`` into Adam) are carried
                over when shapes and dtypes fit, the others start from zero.
        """
        return self.router.reroute(which, to, state)

    @property
    def lr_multiplier(self) -> float | None:
        """The value of ``lr_schedule`` that the next step uses (``None`` without one)."""
        return None if self.lr_schedule is None else as_float(self.lr_schedule(self.step))

    # ------------------------------------------------------------------ state and scalars
    @property
    def state(self) -> dict:
        """``{"states": [state of each optimizer]}``; the same dict on every read."""
        state = self.whole_model.state
        states = state.get("states")
        if not isinstance(states, list):
            states = state["states"] = []
        states[:] = [o.state for o in self.optimizers]
        return state

    @state.setter
    def state(self, state: dict) -> None:
        self._check_state(state)
        for child, child_state in zip(self.optimizers, state["states"]):
            child.state = child_state
        state["states"] = list(state["states"])
        self.whole_model.state = state

    def _check_state(self, state: dict) -> None:
        """Every child's state checked (see ``Optimizer.state``) before any is set."""
        if not isinstance(state, dict) or "states" not in state:
            raise ValueError("MultiOptimizer.state must be a dict {'states': [one state per optimizer]}")
        states = state["states"]
        if not isinstance(states, (list, tuple)) or len(states) != len(self.optimizers):
            count = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
            raise ValueError(f"MultiOptimizer has {len(self.optimizers)} optimizers but the state holds {count} states")
        for i, (child, child_state) in enumerate(zip(self.optimizers, states)):
            try:
                child._check_state(child_state)
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
        for i, (child, value) in enumerate(zip(self.optimizers, values)):  # all checked before any is set
            if value is not None:
                if not hasattr(child, "learning_rate") or isinstance(child, MultiOptimizer):
                    raise TypeError(f"MultiOptimizer: optimizers[{i}] ({self.names[i]}) takes no single learning rate")
                hyper(value, f"MultiOptimizer learning_rate[{i}] ({self.names[i]})")
        for child, value in zip(self.optimizers, values):
            if value is not None:
                child.learning_rate = value
