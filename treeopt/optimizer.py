"""The ``Optimizer`` base class: state, step, schedules, init, apply_gradients, update.

A step goes in three phases, so that bad input never leaves the optimizer half-changed:

1. *Check*: walk the gradients with the parameters, and check every leaf (a parameter
   exists, same library, shape and dtype) and every state slot it will use. Decide the
   owner of each new path (``MultiOptimizer``). Nothing is changed yet; any error names the
   parameter path.
2. *Commit*: record new routes, create slots for new parameters, evaluate schedules and
   increment the step of every optimizer.
3. *Run*: group the leaves by (optimizer, library, dtype, device), compute each group's
   coefficients once, and run the optimizer's rule on each leaf.
"""

from treeopt import _trees
from treeopt.backends import backend_of, default_backend, numpy_backend
from treeopt.errors import MissingParameterError, ParameterError, describe
from treeopt.tree import is_container, items, rebuild

_MISSING = object()
#: state keys that are never parameter names; a top-level parameter with one of these names
#: keeps its slots under the name prefixed with ``~``
RESERVED = ("step", "learning_rate")


class Leaf:
    """One parameter in one step: where it is, its gradient, and what the step decides."""

    __slots__ = ("keys", "grad", "param", "backend", "owner", "slots", "result", "owned")

    def __init__(self, keys, grad, param, backend=None, owned=True):
        self.keys, self.grad, self.param, self.backend = keys, grad, param, backend
        self.owned = owned  # the param is the caller's own array (not made from a number)
        self.owner = self.slots = None
        self.result = param

    @property
    def path(self):
        return _trees.dotted(self.keys)


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
    rule = None
    #: hyper-parameters the rule reads: attributes, or state entries when scheduled
    hyperparameters = ()

    def __init__(self, schedulers=None):
        self._initialized = False
        self._backend = None
        self._state = {"step": default_backend().scalar_array(0, "uint64")}
        self._schedulers = dict(schedulers or {})
        self._params_info = {}  # keys -> (shape, dtype) of each parameter with state, for plans
        self._carried = {}  # keys -> slots to start from when the parameter is initialised
        self._version = 0  # bumped by every change a compiled step depends on
        self._compiled = None  # the step planned once (treeopt.kernels.compiled_step)

    def __repr__(self):
        hyper = ", ".join(f"{n}={getattr(self, n, None)!r}" for n in self.hyperparameters)
        return f"{type(self).__name__}({hyper})"

    # ------------------------------------------------------------------ state and scalars
    @property
    def state(self) -> dict:
        """The live state: ``step``, ``learning_rate``, scheduled hyper-parameters, and one
        dict of slots per parameter, mirroring the parameter tree."""
        return self._state

    @state.setter
    def state(self, state):
        if not isinstance(state, dict):
            raise TypeError(f"{type(self).__name__}.state must be a dict, got {type(state).__name__}")
        required = ["step"] + [k for k in ("learning_rate", *self._schedulers) if k in self._state]
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"{type(self).__name__}.state is missing {', '.join(map(repr, missing))}")
        self._state = state
        self._initialized = False  # the next step checks the new slots against the parameters
        self._backend = None
        self._version += 1

    @property
    def step(self):
        """The number of steps taken, as a scalar array."""
        return self._state["step"]

    @property
    def learning_rate(self):
        if "learning_rate" not in self._state:
            raise AttributeError(f"{type(self).__name__} has no learning_rate")
        return self._state["learning_rate"]

    @learning_rate.setter
    def learning_rate(self, value):
        self._state["learning_rate"] = self._scalar(value)

    def _scalar(self, value, dtype="float32"):
        """A state scalar: an array of the state's library. Numbers (an integer learning
        rate too) become ``dtype``; float16, bfloat16 and float32 arrays keep their dtype."""
        backend = self._backend or backend_of(self._state["step"]) or numpy_backend
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

    def _maybe_schedule(self, name, value):
        """Put hyper-parameter ``name`` in the state, on a schedule if ``value`` is callable."""
        if callable(value):
            self._schedulers[name] = value
            value = value(self.step)
        self._state[name] = self._scalar(value)

    def _hyper(self) -> dict:
        """Current hyper-parameter values: the state's for scheduled ones."""
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

    def _adopt(self, backend):
        """Settle the state's array library; state scalars move to it."""
        if self._backend is backend:
            return
        self._backend = backend
        for key, value in list(self._state.items()):
            owner = backend_of(value)
            if owner is not None and owner is not backend and not is_container(value):
                dtype = owner.dtype_name(value)
                self._state[key] = backend.scalar_array(owner.to_numpy(value), dtype)

    # ------------------------------------------------------------------ per-parameter hooks
    def init_single(self, parameter, state: dict):
        """Fill ``state`` with zero slots for ``parameter``."""
        if self.rule is None:
            raise NotImplementedError(f"{type(self).__name__} must implement init_single")
        backend = backend_of(parameter)
        for name, shape in self.slot_shapes(parameter).items():
            state[name] = backend.zeros(shape, parameter)

    def slot_shapes(self, parameter) -> dict:
        """The shape of each state slot of ``parameter``."""
        shape = tuple(parameter.shape)
        return {n: shape for n in self.rule.slot_names(len(shape), self._hyper())}

    def apply_single(self, gradient, parameter, state: dict):
        """One step for one parameter: returns the new parameter and updates ``state``."""
        if self.rule is None:
            raise NotImplementedError(f"{type(self).__name__} must implement apply_single")
        leaf = Leaf((), gradient, parameter, backend_of(parameter))
        leaf.slots = state
        self._run_rule([leaf], in_place=False)
        return leaf.result

    def _custom(self, hook):
        return getattr(type(self), hook) is not getattr(Optimizer, hook)

    # ------------------------------------------------------------------ init
    def init(self, parameters):
        """Create the state of every parameter in ``parameters`` that has none yet.

        Optional (the first step initialises lazily) and additive: existing slots are kept,
        so it is safe after loading a state.
        """
        leaves = [leaf for leaf in _collect(parameters, parameters, self, check_pairs=False) if leaf.grad is not None]
        backend = self._settle_backend(leaves)
        owners = self._plan(leaves)
        self._commit(backend)
        for owner, keys in _group_keys(leaves, owners).items():
            if owner is not None:  # None: frozen
                owner._mirror(parameters, keys)
        for optimizer in self._optimizers():
            optimizer._initialized = True

    def _mirror(self, parameters, keys):
        """Mirror ``parameters`` into the state, with slots for the leaves at ``keys``."""
        def select(leaf_keys, leaf):
            if leaf_keys not in keys:
                return False
            self._params_info[leaf_keys] = _info(leaf)
            return True

        def init_leaf(leaf_keys, param, slots):
            backend = backend_of(param)
            if backend.name == "python":
                param = (self._backend or numpy_backend).scalar_array(param, "float32")
            self.init_single(param, slots)
            carried = self._carried.pop(leaf_keys, None)
            if carried:  # slots handed over by MultiOptimizer.reroute(..., state="carry")
                for name, value in carried.items():
                    if name in slots and _fits(value, slots[name]):
                        slots[name] = value

        self._version += 1
        entries = items(parameters) if is_container(parameters) else ()
        for key, child in entries:
            if not is_container(child):
                if (key,) not in keys:
                    continue
                self._params_info[(key,)] = _info(child)
            skey = self._state_key(key)
            found = _trees.lookup(self._state, skey)
            if found is not None and skey not in self._state:
                del self._state[str(skey)]
            self._state[skey] = _trees.mirror(found, child, select, init_leaf, (key,))

    def _state_key(self, key):
        return "~" + key if key in RESERVED or key in self._schedulers else key

    _SNAPSHOT = ("_initialized", "_backend", "_params_info", "_carried", "_version", "_compiled")

    def _snapshot(self):
        """A function that puts the optimizer back as it is now: the state's containers and
        the bookkeeping (arrays are not copied: what is snapshotted is what ``init`` and a
        load add, not what a step writes)."""
        from treeopt.tree import tree_map

        saved = [(o, tree_map(lambda x: x, o._state), {k: _copy(getattr(o, k)) for k in o._SNAPSHOT})
                 for o in self._bookkeepers()]

        def restore():
            for optimizer, state, attributes in saved:
                optimizer._state = state
                for key, value in attributes.items():
                    setattr(optimizer, key, value)
        return restore

    def _bookkeepers(self):
        return [self]

    def _scalar_names(self):
        """The state entries that are not parameters: step, learning rate, schedules."""
        return [k for k in dict.fromkeys(("step", "learning_rate", *self._schedulers)) if k in self._state]

    def _slot_items(self):
        """``(keys, slot dict)`` of every parameter with state, in state order."""
        scalars = set(self._scalar_names())

        def walk(node, keys):
            if isinstance(node, dict):
                if node and not any(is_container(v) for v in node.values()):
                    yield keys, node
                    return
                children = node.items()
            elif isinstance(node, (list, tuple)):
                children = enumerate(node)
            else:
                return
            for key, child in children:
                yield from walk(child, keys + (key,))

        for key, child in self._state.items():
            if key in scalars:
                continue
            if isinstance(key, str) and key.startswith("~") and key[1:] in (*RESERVED, *self._schedulers):
                key = key[1:]
            yield from walk(child, (key,))

    def _drop(self, keys):
        """Forget the state of the parameter at ``keys``; returns its slots."""
        self._version += 1
        slots = self._slots_at(keys) or {}
        if slots:
            root_key = self._state_key(keys[0])
            if _trees.lookup(self._state, root_key) is not None and root_key not in self._state:
                root_key = str(root_key)
            self._state[root_key] = _trees.assign(self._state[root_key], keys[1:], {})
        self._params_info.pop(keys, None)
        return dict(slots)

    def unsuited(self, path, parameter):
        """Why this optimizer should not get ``parameter``, or ``None``. ``MultiOptimizer``
        checks it when it routes a parameter here (Muon: vectors, embeddings, heads)."""
        return None

    def _slots_at(self, keys):
        node = _trees.lookup(self._state, self._state_key(keys[0]))
        return _trees.lookup_path(node, keys[1:]) if node is not None else None

    # ------------------------------------------------------------------ routing hooks
    def _plan(self, leaves):
        """The optimizer that owns each leaf. ``MultiOptimizer`` routes; decisions for new
        paths are kept aside until :meth:`_commit`."""
        return [self] * len(leaves)

    def _commit(self, backend):
        """Record the routes decided by :meth:`_plan`, and settle the state's library."""
        if backend is not None:
            for optimizer in self._optimizers():
                optimizer._adopt(backend)

    def _optimizers(self):
        """The optimizers that hold state and take steps."""
        return [self]

    def _named_optimizers(self, name=None, position=()):
        """``(name, position, optimizer)`` of every optimizer that holds state."""
        return [(name or type(self).__name__, position, self)]

    def _routing_table(self):
        """``(keys, optimizer, rule, also matched, notes)`` of every parameter known; the
        optimizer is ``None`` for a frozen parameter."""
        return [(keys, self, "all parameters", (), ()) for keys in self._params_info]

    def _info_of(self, keys):
        """``(shape, dtype)`` of a known parameter."""
        return self._params_info.get(keys, ((), "?"))

    def _plan_warnings(self):
        """What the plan should point out (``MultiOptimizer``: filters that match nothing)."""
        return []

    def _prepare_step(self, leaves, owners):
        """Whole-model work between checking and committing (``MultiOptimizer``: clipping,
        the non-finite guard, accumulation). Returns the leaves and owners to update, the
        optimizers that take a step, and a function that commits the hook's own state."""
        return leaves, owners, self._optimizers(), None

    def plan(self, params=None):
        """The routing plan (a :class:`treeopt.plan.Plan`): for every parameter, its optimizer
        and why, shape, dtype, size, state bytes and the hyper-parameters of the next step.

        With ``params``, new parameters are routed and initialised first, exactly as a step
        would: the plan shown is the plan used.
        """
        from treeopt.plan import build

        if params is not None:
            self.init(params)
        return build(self)

    def _current_hyper(self):
        """The hyper-parameters the next step will use, as Python values."""
        step = self._state["step"]
        values = {}
        if "learning_rate" in self._state:
            lr = self._schedulers["learning_rate"](step) if "learning_rate" in self._schedulers else self._state["learning_rate"]
            values["learning_rate"] = _as_float(lr)
        def plain(value):
            if isinstance(value, tuple):
                return tuple(plain(v) for v in value)
            return value if isinstance(value, (bool, str, int, type(None))) else _as_float(value)

        for name in self.hyperparameters:
            values[name] = plain(self._value(name, evaluate=lambda schedule: schedule(step)))
        return values

    # ------------------------------------------------------------------ the step
    def apply_gradients(self, gradients, parameters):
        """Apply one step and return the new parameters, with the structure of
        ``gradients``. ``parameters`` may hold more entries than ``gradients``; a ``None``
        gradient leaves its parameter (and its state) as they are. Inputs are not changed.
        """
        return self._apply(gradients, parameters, in_place=False)[0]

    def update(self, model, gradients):
        """Apply one step to ``model`` (a tree of arrays, or an ``mlx.nn.Module``).

        NumPy and torch arrays are written in place, so every reference to them sees the new
        values; immutable arrays (JAX, MLX) are replaced inside the model's containers. When
        the tree keeps its structure, later steps reuse the plan of the first one (see
        :mod:`treeopt.kernels.compiled_step`).
        """
        compiled = self._compiled
        if compiled is not None and compiled.run(gradients, model):
            return
        new, leaves, active, stepping = self._apply(gradients, model, in_place=True)
        self._compiled = _compile(self, gradients, model, leaves, active, stepping)
        replaced = [leaf for leaf in leaves if leaf.result is not leaf.param or not leaf.owned]
        if not replaced:
            return
        if not is_container(model) and hasattr(model, "update"):
            model.update(new)
            return
        for leaf in replaced:
            if _trees.assign(model, leaf.keys, leaf.result) is not model:
                raise TypeError(
                    f"cannot update {describe(leaf.path)} inside a tuple at the root of the model; "
                    "use apply_gradients and keep its result")

    def _apply(self, gradients, parameters, in_place):
        # 1. check
        leaves = _collect(gradients, parameters, self)
        active = [leaf for leaf in leaves if leaf.grad is not None]
        backend = self._settle_backend(active)
        owners = self._plan(active)
        kept = [(leaf, owner) for leaf, owner in zip(active, owners) if owner is not None]  # None: frozen
        active, owners = [leaf for leaf, _ in kept], [owner for _, owner in kept]
        to_mirror = {}  # owner -> keys of the leaves it must (re)mirror into its state
        for leaf, owner in zip(active, owners):
            leaf.owner = owner
            leaf.slots = owner._slots_at(leaf.keys)
            if leaf.slots and not owner._initialized:
                owner._check_slots(leaf)
            if not leaf.slots or not owner._initialized:
                to_mirror.setdefault(owner, set()).add(leaf.keys)
        active, owners, stepping, commit_hook = self._prepare_step(active, owners)
        updating = {(id(leaf.owner), leaf.keys) for leaf in active}  # a skipped leaf gets no state yet
        to_mirror = {o: {k for k in keys if (id(o), k) in updating} for o, keys in to_mirror.items()}
        # 2. commit
        self._commit(backend)
        if commit_hook is not None:
            commit_hook()
        for owner, keys in to_mirror.items():
            if not keys:
                continue
            owner._mirror(parameters, keys)
            for leaf in active:
                if leaf.owner is owner:
                    leaf.slots = owner._slots_at(leaf.keys)
        for optimizer in self._optimizers():
            optimizer._initialized = True
        for optimizer in stepping:
            optimizer._advance()
        # 3. run
        for group in _buckets(active).values():
            group[0].owner._run(group, in_place)
        return _rebuild(gradients, iter(leaves)), leaves, active, stepping

    def _settle_backend(self, leaves):
        """The one array library of these leaves and of the state; checked, not adopted."""
        expected = next((o._backend for o in self._optimizers() if o._backend is not None), None)
        first = None
        for leaf in leaves:
            if expected is None:
                expected, first = leaf.backend, leaf
            elif leaf.backend is not expected:
                other = f"{describe(first.path)} is a" if first else "the optimizer state holds"
                raise ParameterError(
                    f"{type(self).__name__}: {describe(leaf.path)} is a {leaf.backend.name} array, but "
                    f"{other} {expected.name} array; one optimizer works on arrays of one library",
                    leaf.path)
        return expected

    def _check_slots(self, leaf):
        """A state set from outside must fit its parameter: no silent broadcasting."""
        expected = self.slot_shapes(leaf.param)
        for name, shape in expected.items():
            if name not in leaf.slots:
                raise ParameterError(
                    f"{type(self).__name__}: the state of {describe(leaf.path)} has no slot {name!r} "
                    f"(it has {sorted(leaf.slots)})", leaf.path)
            slot = leaf.slots[name]
            backend = backend_of(slot)
            if backend is not leaf.backend:
                raise ParameterError(
                    f"{type(self).__name__}: slot {name!r} of {describe(leaf.path)} is a "
                    f"{getattr(backend, 'name', type(slot).__name__)} array but the parameter is a "
                    f"{leaf.backend.name} array", leaf.path)
            if tuple(backend.shape(slot)) != shape:
                raise ParameterError(
                    f"{type(self).__name__}: slot {name!r} of {describe(leaf.path)} has shape "
                    f"{tuple(backend.shape(slot))}, expected {shape}", leaf.path)

    def _advance(self):
        """Evaluate the schedules at the current step, then count the step."""
        step = self._state["step"]
        for name, schedule in self._schedulers.items():
            self._state[name] = self._scalar(schedule(step))
        self._state["step"] = step + 1

    def _run(self, leaves, in_place):
        if self._custom("apply_single") or self.rule is None:
            for leaf in leaves:
                _store_param(leaf, self.apply_single(leaf.grad, leaf.param, leaf.slots), in_place)
        else:
            self._run_rule(leaves, in_place)

    def _coefficients(self, like, backend):
        lr = self._state.get("learning_rate")
        if lr is not None:
            lr = backend.cast(lr, like)
        # Step-dependent scalars are computed in float32, as MLX computes them.
        step = backend.astype(self._state["step"], "float32")
        values = self.rule.coefficients(lr, step, **self._hyper())
        return {k: v if v is None or isinstance(v, (bool, int, str)) else backend.cast(v, like)
                for k, v in values.items()}

    def _run_rule(self, leaves, in_place):
        """Run this optimizer's rule on leaves of one library, dtype and device."""
        rule, first = self.rule, leaves[0]
        coefficients = self._coefficients(first.param, first.backend)
        hyper = self._hyper() if callable(rule.slots) else None
        for leaf in leaves:
            names = rule.slot_names(len(leaf.backend.shape(leaf.param)), hyper)
            slots = leaf.slots
            with first.backend.quiet():
                new_param, *new_slots = rule.update(leaf.grad, leaf.param, *(slots[n] for n in names), **coefficients)
            for name, value in zip(names, new_slots):
                _store_slot(leaf.backend, slots, name, value)
            _store_param(leaf, new_param, in_place)


# ---------------------------------------------------------------------- helpers
def _compile(optimizer, gradients, model, leaves, active, stepping):
    """The plan of the step just taken, for the next ``update``; ``None`` when it cannot be
    reused (immutable arrays, whole-model options, a custom ``apply_single``...)."""
    from treeopt import kernels

    options = getattr(optimizer, "whole_model", None)
    if not kernels.enabled or (options is not None and options.active):
        return None
    if not active or not active[0].backend.mutable:
        return None
    from treeopt.kernels.compiled_step import CompiledStep

    return CompiledStep.build(optimizer, gradients, model, leaves, active, stepping)


def _as_float(value):
    backend = backend_of(value)
    return float(value) if backend is None or backend.name == "python" else backend.to_float(value)


def _copy(value):
    return dict(value) if isinstance(value, dict) else set(value) if isinstance(value, set) else value


def _info(param):
    """``(shape, dtype)`` of a parameter, for plans."""
    backend = backend_of(param)
    if backend is None or backend.name == "python":
        return (), "float32"  # a number becomes a float32 0-d array
    return tuple(backend.shape(param)), backend.dtype_name(param)


def _fits(value, like):
    a, b = backend_of(value), backend_of(like)
    return a is b and tuple(a.shape(value)) == tuple(b.shape(like)) and a.dtype_name(value) == b.dtype_name(like)


def _store_slot(backend, slots, name, value):
    old = slots[name]
    if backend.mutable and backend.writable(old):
        if value is not old:
            backend.write(old, value)
    else:
        slots[name] = backend.as_array(value)


def _store_param(leaf, value, in_place):
    if in_place and leaf.owned and leaf.backend.mutable and leaf.backend.writable(leaf.param):
        leaf.backend.write(leaf.param, value)
        leaf.result = leaf.param
    else:
        leaf.result = leaf.backend.as_array(value)


def _buckets(leaves):
    groups = {}
    for leaf in leaves:
        b = leaf.backend
        key = (id(leaf.owner), b.name, b.dtype_name(leaf.param), b.device(leaf.param))
        groups.setdefault(key, []).append(leaf)
    return groups


def _group_keys(leaves, owners):
    grouped = {}
    for leaf, owner in zip(leaves, owners):
        grouped.setdefault(owner, set()).add(leaf.keys)
    return grouped


def _child(node, key):
    if isinstance(node, dict):
        return node[key] if key in node else _MISSING
    if isinstance(node, (list, tuple)) and isinstance(key, int) and 0 <= key < len(node):
        return node[key]
    return _MISSING


def _collect(gradients, parameters, optimizer, check_pairs=True):
    """Every leaf of ``gradients`` with its parameter, checked; in flatten order.

    With ``check_pairs=False`` (``init``), ``gradients`` is the parameter tree itself.
    """
    name = type(optimizer).__name__
    if not is_container(gradients):
        raise TypeError(f"{name}: expected a tree (dict, list or tuple) of arrays, got {type(gradients).__name__}")
    leaves = []

    def walk(grad, param, keys):
        if is_container(grad):
            if param is not _MISSING and not is_container(param):
                raise ParameterError(
                    f"{name}: the gradients have a sub-tree at {describe(_trees.dotted(keys))} "
                    f"but the parameter there is a {type(param).__name__}", _trees.dotted(keys))
            for key, child in items(grad):
                walk(child, _MISSING if param is _MISSING else _child(param, key), keys + (key,))
        else:
            leaves.append(_leaf(name, grad, param, keys, check_pairs))

    walk(gradients, parameters, ())
    return leaves


def _leaf(name, grad, param, keys, check_pairs):
    path = _trees.dotted(keys)
    if grad is None:
        return Leaf(keys, None, None if param is _MISSING else param)
    if param is _MISSING:
        raise MissingParameterError(
            f"{name}: there is a gradient for {describe(path)} but no parameter at that path", path)
    grad_backend, param_backend = backend_of(grad), backend_of(param)
    if param_backend is None:
        raise ParameterError(f"{name}: the parameter at {describe(path)} is a {type(param).__name__}, not an array", path)
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
            "only floating-point parameters can be optimized", path)
    return Leaf(keys, grad, param, param_backend, owned)


def _check_pair(name, path, grad, grad_backend, param, param_backend):
    if grad_backend is not param_backend:
        raise ParameterError(
            f"{name}: the gradient at {describe(path)} is a {grad_backend.name} array but the "
            f"parameter is a {param_backend.name} array", path)
    g_shape, p_shape = tuple(grad_backend.shape(grad)), tuple(param_backend.shape(param))
    if g_shape != p_shape:
        raise ParameterError(
            f"{name}: the gradient at {describe(path)} has shape {g_shape} but the parameter "
            f"has shape {p_shape}", path)
    g_dtype, p_dtype = grad_backend.dtype_name(grad), param_backend.dtype_name(param)
    if g_dtype != p_dtype:
        raise ParameterError(
            f"{name}: the gradient at {describe(path)} is {g_dtype} but the parameter is "
            f"{p_dtype}; cast the gradient to the parameter's dtype", path)


def _rebuild(tree, leaves):
    """``tree``'s structure with each leaf replaced by the next leaf's result."""
    if is_container(tree):
        if isinstance(tree, dict):
            return rebuild(tree, ((k, _rebuild(v, leaves)) for k, v in tree.items()))
        return rebuild(tree, [_rebuild(v, leaves) for v in tree])
    return next(leaves).result
