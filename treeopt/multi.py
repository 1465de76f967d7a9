"""``MultiOptimizer``: each parameter goes to the first optimizer whose filter accepts it.

The route of a path is decided once, the first time the path is seen, from the parameter
(not the gradient), and reused on every later step: filters are not called again for known
paths, so a filter that looks at values or dtypes cannot move a parameter away from its
state. The caller's tree structure is kept exactly, whatever the number of optimizers.
"""

from treeopt.errors import TreeoptError, describe
from treeopt.optimizer import Optimizer


class RoutingError(TreeoptError, ValueError):
    """A filter failed on a parameter."""


def _accept_all(path, weight):
    return True


def _default_names(optimizers):
    names = []
    for optimizer in optimizers:
        base = type(optimizer).__name__
        count = sum(n == base or n.startswith(base + "_") for n in names)
        names.append(base if count == 0 else f"{base}_{count}")
    return names


def _name(fn):
    return getattr(fn, "__name__", None) or type(fn).__name__


class MultiOptimizer(Optimizer):
    """Different optimizers for different parameters.

    Args:
        optimizers (list[Optimizer]): the optimizers; the last one takes every parameter that
            no filter accepts.
        filters (list[Callable[[str, array], bool]]): one predicate per optimizer but the
            last, called as ``filter(path, parameter)`` with the dotted path (for example
            ``"layers.0.attn.weight"``) and the parameter. The first filter that returns a
            true value wins.
        names (list[str], optional): a name per optimizer, shown in plans and stored in
            checkpoints (default: the class names, numbered when repeated).

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

    def __init__(self, optimizers, filters=(), *, names=None):
        super().__init__()
        optimizers, filters = list(optimizers), list(filters)
        if len(filters) != len(optimizers) - 1:
            raise ValueError(f"Given {len(filters)} filters but {len(optimizers) - 1} needed.")
        for i, child in enumerate(optimizers):
            if not isinstance(child, Optimizer):
                raise TypeError(f"MultiOptimizer: optimizers[{i}] is a {type(child).__name__}, not an Optimizer")
        for i, fn in enumerate(filters):
            if not callable(fn):
                raise TypeError(f"MultiOptimizer: filters[{i}] is a {type(fn).__name__}, not a callable")
        if names is not None and (len(names) != len(optimizers) or len(set(names)) != len(names)):
            raise ValueError(f"MultiOptimizer: names must be {len(optimizers)} distinct strings, got {names!r}")
        self.optimizers = optimizers
        self.filters = filters + [_accept_all]
        self.names = list(names) if names is not None else _default_names(optimizers)
        self._routes = {}  # keys of a parameter -> index of its optimizer
        self._pending = {}  # routes decided during a step that has not committed yet
        self._state = {"states": [o.state for o in optimizers]}

    def __repr__(self):
        return f"MultiOptimizer([{', '.join(map(repr, self.optimizers))}])"

    # ------------------------------------------------------------------ routing
    def _route(self, leaf):
        for i, fn in enumerate(self.filters):
            try:
                accepted = fn(leaf.path, leaf.param)
            except Exception as error:
                raise RoutingError(
                    f"MultiOptimizer: filters[{i}] ({_name(fn)}) raised {type(error).__name__}: {error} "
                    f"on {describe(leaf.path)}") from error
            if accepted:
                return i
        raise AssertionError("the last filter accepts everything")

    def _plan(self, leaves):
        self._pending = {}
        indices = []
        for leaf in leaves:
            i = self._routes.get(leaf.keys)
            if i is None:
                i = self._pending.get(leaf.keys)
                if i is None:
                    i = self._pending[leaf.keys] = self._route(leaf)
            indices.append(i)
        owners = [None] * len(leaves)
        for i, child in enumerate(self.optimizers):
            mine = [j for j, k in enumerate(indices) if k == i]
            if mine:
                for j, owner in zip(mine, child._plan([leaves[j] for j in mine])):
                    owners[j] = owner
        return owners

    def _commit(self, backend):
        self._routes.update(self._pending)
        self._pending = {}
        for child in self.optimizers:
            child._commit(backend)

    def _optimizers(self):
        return [o for child in self.optimizers for o in child._optimizers()]

    def route(self, path):
        """The index of the optimizer that owns ``path`` (a dotted path or keys tuple), or
        ``None`` for a path not seen yet."""
        if isinstance(path, tuple):
            return self._routes.get(path)
        return next((i for keys, i in self._routes.items() if ".".join(map(str, keys)) == path), None)

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
    def state(self, state):
        if not isinstance(state, dict) or "states" not in state:
            raise ValueError("MultiOptimizer.state must be a dict {'states': [one state per optimizer]}")
        states = state["states"]
        if not isinstance(states, (list, tuple)) or len(states) != len(self.optimizers):
            count = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
            raise ValueError(
                f"MultiOptimizer has {len(self.optimizers)} optimizers but the state holds {count} states")
        for i, (child, child_state) in enumerate(zip(self.optimizers, states)):
            try:
                child.state = child_state
            except (TypeError, ValueError) as error:
                raise type(error)(f"states[{i}]: {error}") from error
        state["states"] = list(states)
        self._state = state

    @property
    def step(self):
        """The number of steps taken (every optimizer counts every step)."""
        return self.optimizers[0].step

    @property
    def learning_rate(self):
        """One learning rate per optimizer (``None`` for one without)."""
        return [getattr(o, "learning_rate", None) for o in self.optimizers]

    @learning_rate.setter
    def learning_rate(self, values):
        if not isinstance(values, (list, tuple)):
            raise TypeError(
                f"MultiOptimizer has {len(self.optimizers)} learning rates, one per optimizer; set them "
                "all with a list (e.g. multi.learning_rate = [0.02, 3e-4]) or one with "
                "multi.optimizers[i].learning_rate = value")
        if len(values) != len(self.optimizers):
            raise ValueError(f"MultiOptimizer has {len(self.optimizers)} optimizers but got {len(values)} learning rates")
        for child, value in zip(self.optimizers, values):
            if value is not None:
                child.learning_rate = value
