"""The catalogue of bad inputs and faults: each one raises a clear error (its type, and a
message naming what is wrong) and leaves the parameters and the optimizer bit-identical.

One table, ``CASES``, built from a few worlds (an optimizer with its parameters, after two
steps, so the compiled step is planned) and generators of bad inputs; one test runs them all.
docs/reliability.md quotes the count (``test_the_catalogue_is_large_enough``).
"""

import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

import treeopt as optim
from arrays import available, make
from treeopt import checkpoint, filters, ops
from treeopt.checkpoint import files
from treeopt.errors import ParameterError
from treeopt.multi import RoutingError
from treeopt.tree import tree_flatten

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.RoutingWarning")
BACKENDS = [b for b in ("numpy", "torch", "jax") if available(b)]


# ------------------------------------------------------------------------------ worlds
def values():
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 4)),
        "b": rng.standard_normal(4),
        "layers": [{"w": rng.standard_normal((4, 4))}, {"w": rng.standard_normal((4, 4))}],
    }


def tree_on(tree, backend, dtype="float32"):
    if isinstance(tree, dict):
        return {k: tree_on(v, backend, dtype) for k, v in tree.items()}
    if isinstance(tree, list):
        return [tree_on(v, backend, dtype) for v in tree]
    return make(tree, backend, dtype)


def grads_like(params, scale=0.1):
    if isinstance(params, dict):
        return {k: grads_like(v, scale) for k, v in params.items()}
    if isinstance(params, list):
        return [grads_like(v, scale) for v in params]
    return params * scale + 0.01 if not isinstance(params, np.ndarray) else (params * scale + 0.01).astype(params.dtype)


class World:
    """An optimizer and its parameters after two steps; ``mode`` drives its schedule."""

    def __init__(self, kind, backend):
        self.backend, self.kind, self.mode = backend, kind, ["ok"]
        mode = self.mode

        def schedule(step):
            if mode[0] == "ok":
                return 1e-2
            if mode[0] == "raise":
                raise RuntimeError("the schedule failed")
            return {
                "nan": float("nan"),
                "inf": float("inf"),
                "string": "1e-2",
                "vector": np.ones(3, np.float32),
                "none": None,
            }[mode[0]]

        if kind == "single":
            self.opt = optim.Adam(schedule)
        elif kind == "compact":  # every matrix's slots as int8 codes and scales, or bfloat16
            int8 = optim.StatePrecision("int8", min_size=0)
            self.opt = optim.MultiOptimizer(
                [
                    optim.Adam(1e-2, state_dtype=int8),
                    optim.AdamW(schedule, state_dtype="bfloat16"),
                    optim.SGD(0.1, momentum=0.9, state_dtype=int8),
                ],
                [lambda path, w: path.startswith("layers"), lambda path, w: path == "w"],
            )
        else:
            self.opt = optim.MultiOptimizer(
                [optim.Adam(1e-2), optim.AdamW(schedule), optim.SGD(0.1, momentum=0.9)],
                [lambda path, w: path.startswith("layers"), lambda path, w: path == "w"],
            )
        self.params = tree_on(values(), backend)
        for _ in range(2):
            self.step(self.grads())

    def grads(self):
        return grads_like(self.params)

    def step(self, grads, entry="update"):
        if entry == "update" and self.backend != "jax":
            self.opt.update(self.params, grads)
        else:
            self.params = self.opt.apply_gradients(grads, self.params)


def as_bytes(x):
    from treeopt.backends import backend_of

    backend = backend_of(x)
    if backend is None:
        return ("object", repr(x))
    if backend.name == "python":
        return ("python", repr(x))
    array = np.asarray(backend.to_numpy(x))
    return (backend.name, array.dtype.name, array.shape, array.tobytes())


def fingerprint(world):
    opt = world.opt
    state = {k: as_bytes(v) for k, v in tree_flatten(opt.state)}
    params = {k: as_bytes(v) for k, v in tree_flatten(world.params)}
    books = [
        (
            dict(o.store.parameters),
            o.store.checked,
            getattr(o.store.backend, "name", None),
            {k: {s: as_bytes(v) for s, v in slots.items()} for k, slots in o.store.carried.items()},
            dict(o.store.options),
        )
        for _, _, o in opt.groups()
    ]
    routing = (opt.routes(), list(opt.changes)) if isinstance(opt, optim.MultiOptimizer) else None
    return state, params, books, routing, adapter_fingerprint(getattr(world, "adapter", None))


def adapter_fingerprint(adapter):
    """What a treeopt.torch.Optimizer keeps beside the optimizer: its groups (values and
    members), the values it last published, where each parameter goes, and the
    hyper-parameters its treeopt optimizers hold."""
    if adapter is None:
        return None
    groups = [
        (id(group), {k: as_bytes(v) if k != "params" else [id(p) for p in v] for k, v in group.items()})
        for group in adapter.param_groups
    ]
    return (
        groups,
        repr(adapter._published),
        dict(adapter._group_of),
        sorted(adapter._unrouted),
        dict(adapter.parameters),
        [repr(group.scalars.current()) for _, _, group in adapter.optimizer.groups()],
    )


@dataclass
class Case:
    id: str
    world: Callable  # () -> World
    act: Callable  # (World) -> None: the bad thing
    error: type
    match: str  # a regex the message must contain: what is wrong, and where


CASES = []


def case(id, world, act, error, match):
    CASES.append(Case(id, world, act, error, match))


def world(kind, backend):
    return lambda: World(kind, backend)


# ------------------------------------------------------------------------------ gradients
def set_at(tree, path, value):
    """A copy of the gradient tree with ``path`` (a tuple of keys) replaced (or removed)."""
    import copy

    tree = copy.copy(tree)
    node = tree
    for key in path[:-1]:
        child = copy.copy(node[key])
        node[key] = child
        node = child
    if value is _REMOVE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


_REMOVE = object()


def other_library(backend):
    return "numpy" if backend != "numpy" else ("torch" if available("torch") else None)


def gradient_cases(backend, kind, entry):
    def bad(make_grads, arrange=None):
        act = lambda world: world.step(make_grads(world), entry)  # noqa: E731
        return act if arrange is None else (arrange, act)

    yield (
        "wrong shape",
        bad(lambda wd: set_at(wd.grads(), ("layers", 1, "w"), make(np.ones((4, 5)), backend))),
        ParameterError,
        r"'layers\.1\.w' has shape \(4, 5\) but the parameter has shape \(4, 4\)",
    )
    yield (
        "wrong dtype",
        bad(lambda wd: set_at(wd.grads(), ("b",), make(np.ones(4), backend, "float16"))),
        ParameterError,
        r"'b' is float16 but the parameter is float32",
    )
    other = other_library(backend)
    if other:
        yield (
            "another library",
            bad(lambda wd: set_at(wd.grads(), ("w",), make(np.ones((3, 4)), other))),
            ParameterError,
            rf"'w' is a {other} array but the parameter is a {backend} array",
        )
    yield (
        "no parameter at the path",
        bad(lambda wd: set_at(wd.grads(), ("extra",), make(np.ones(2), backend))),
        ParameterError,
        r"gradient for 'extra' but no parameter",
    )
    yield (
        "a string gradient",
        bad(lambda wd: set_at(wd.grads(), ("layers", 0, "w"), "0.1")),
        ParameterError,
        r"gradient at 'layers\.0\.w' is a str, not an array",
    )
    yield (
        "a sub-tree where the parameter is an array",
        bad(lambda wd: set_at(wd.grads(), ("b",), {"x": make(np.ones(4), backend)})),
        ParameterError,
        r"sub-tree at 'b' but the parameter there is",
    )
    yield "not a tree", bad(lambda wd: make(np.ones(4), backend)), TypeError, r"expected a tree"

    def reshaped(wd):  # the parameter at a known path changed shape (a resized layer)
        wd.params["b"] = make(np.ones(6), backend)

    yield (
        "parameter changed shape under its path",
        bad(lambda wd: wd.grads(), reshaped),
        ParameterError,
        r"slot '\w+' of 'b' has shape \(4,\), expected \(6,\)",
    )

    def integer_parameter(wd):
        wd.params["b"] = make(np.ones(4), backend, "int32") if backend != "numpy" else np.ones(4, np.int32)

    yield (
        "integer parameter",
        bad(lambda wd: wd.grads(), integer_parameter),
        ParameterError,
        r"'b' (has dtype int32; only floating-point|is float32 but the parameter is int32)",
    )
    # (through the engine: the compiled step holds the slot arrays it planned with; state is
    # replaced through opt.state = ..., which is checked, see the state cases)
    faults = (("slot of another dtype", "dtype"), ("slot replaced by a list", "list")) if entry != "update" else ()
    for label, slot_fault in faults:

        def corrupt(wd, fault=slot_fault):
            owner = wd.opt.router.owner(("b",))

            slots = owner.store.slots(("b",))
            name = sorted(slots)[0]
            slots[name] = make(np.ones(4), backend, "float16") if fault == "dtype" else [0.0] * 4

        yield (
            label,
            bad(lambda wd: wd.grads(), corrupt),
            ParameterError,
            (
                r"slot '\w+' of 'b' is float16 but the parameter is float32"
                if slot_fault == "dtype"
                else r"slot '\w+' of 'b' is a list, not"
            ),
        )


for backend in BACKENDS:
    for kind in ("single", "multi"):
        for entry in ("update", "apply_gradients") if backend != "jax" else ("apply_gradients",):
            for label, act, error, match in gradient_cases(backend, kind, entry):
                case(f"{backend}-{kind}-{entry}: {label}", world(kind, backend), act, error, match)


# ------------------------------------------------------------------------------ numbers and schedules
def set_attr(target, name, value):
    def act(wd):
        setattr(target(wd), name, value)

    return act


for backend in [b for b in BACKENDS if b != "jax"]:
    for kind in ("single", "multi"):
        for mode, error, match in (
            ("nan", ValueError, r"learning_rate.*at step 2 returned a value that must be finite"),
            ("inf", ValueError, r"at step 2 returned a value that must be finite, got inf"),
            ("string", TypeError, r"at step 2 returned a value that must be a number.*str"),
            ("vector", ValueError, r"at step 2 returned a value that must be one number"),
            ("none", TypeError, r"at step 2 returned a value that must be a number"),
            ("raise", RuntimeError, r"the schedule failed"),
        ):

            def act(wd, mode=mode):
                wd.mode[0] = mode
                wd.step(wd.grads())

            case(f"{backend}-{kind}: schedule {mode} mid-training", world(kind, backend), act, error, match)
    single = world("single", backend)
    for label, value, error, match in (
        ("nan", float("nan"), ValueError, r"Adam learning_rate must be finite, got nan"),
        ("inf", float("inf"), ValueError, r"Adam learning_rate must be finite, got inf"),
        ("vector", np.ones(2, np.float32), ValueError, r"learning_rate must be one number"),
        ("string", "0.1", TypeError, r"learning_rate must be a number.*str"),
        ("bool array", np.array(True), TypeError, r"learning_rate must be a number.*bool"),
    ):
        case(
            f"{backend}: learning_rate setter {label}",
            single,
            set_attr(lambda wd: wd.opt, "learning_rate", value),
            error,
            match,
        )
    multi = world("multi", backend)
    case(
        f"{backend}: multi learning_rate, bad second value",
        multi,
        set_attr(lambda wd: wd.opt, "learning_rate", [0.5, float("nan"), 0.1]),
        ValueError,
        r"learning_rate\[1\] \(AdamW\) must be finite",
    )
    case(
        f"{backend}: multi learning_rate, wrong count",
        multi,
        set_attr(lambda wd: wd.opt, "learning_rate", [0.5, 0.1]),
        ValueError,
        r"3 optimizers but got 2 learning rates",
    )
    case(
        f"{backend}: multi learning_rate, a number",
        multi,
        set_attr(lambda wd: wd.opt, "learning_rate", 0.5),
        TypeError,
        r"one per optimizer",
    )

for label, make_opt, error, match in (
    ("Adam(nan)", lambda: optim.Adam(float("nan")), ValueError, r"Adam learning_rate must be finite"),
    ("Adam(eps=nan)", lambda: optim.Adam(1e-3, eps=float("nan")), ValueError, r"Adam eps must be a finite number"),
    (
        "AdamW(weight_decay=inf)",
        lambda: optim.AdamW(1e-3, weight_decay=float("inf")),
        ValueError,
        r"weight_decay must be a finite number",
    ),
    ("SGD(momentum=-1)", lambda: optim.SGD(0.1, momentum=-1.0), ValueError, r"momentum should be >=0"),
    (
        "Adam(schedule returning a string)",
        lambda: optim.Adam(lambda step: "x"),
        TypeError,
        r"its schedule '<lambda>' at step 0 returned a value that must be a number",
    ),
    ("RMSprop(eps=0)", lambda: optim.RMSprop(1e-3, eps=0.0), ValueError, r"epsilon should be >0"),
    (
        "the same instance twice",
        lambda: (lambda a: optim.MultiOptimizer([a, a], [lambda p, w: True]))(optim.Adam(0.1)),
        ValueError,
        r"optimizers\[1\] is \(or holds\) the same Adam instance as optimizers\[0\]",
    ),
    (
        "too few filters",
        lambda: optim.MultiOptimizer([optim.Adam(0.1), optim.SGD(0.1)], []),
        ValueError,
        r"Given 0 filters but 1 needed",
    ),
    (
        "a filter that is not callable",
        lambda: optim.MultiOptimizer([optim.Adam(0.1), optim.SGD(0.1)], ["w"]),
        TypeError,
        r"filters\[0\] is a str, not a callable",
    ),
    (
        "Muon(cautious decay of a coupled decay)",
        lambda: optim.Muon(0.02, cautious_weight_decay=True),
        ValueError,
        r"Muon cautious_weight_decay .* needs decoupled_weight_decay=True",
    ),
    (
        "Muon(an unknown coefficient table)",
        lambda: optim.Muon(0.02, ns_coefficients="polar"),
        ValueError,
        r"Muon ns_coefficients should be one of \('keller2024', 'polar_express'\), 'polar' was provided",
    ),
    (
        "Muon(NorMuon's longer side with heads)",
        lambda: optim.Muon(0.02, normuon="larger", num_heads=4),
        ValueError,
        r"normuon='larger' picks rows or columns per matrix; with num_heads or split_sizes use normuon='output'",
    ),
):
    case(f"constructor: {label}", world("single", "numpy"), lambda wd, make_opt=make_opt: make_opt(), error, match)


# ------------------------------------------------------------------------------ state setters
def adam_state_into_sgd(wd):
    sgd = wd.opt.optimizers[2]
    adam = wd.opt.optimizers[0]
    wd.opt.state = {"states": [wd.opt.state["states"][0], wd.opt.state["states"][1], adam.state]}
    _ = sgd


for backend in [b for b in BACKENDS if b != "jax"]:
    single, multi = world("single", backend), world("multi", backend)

    def with_step(value):
        return lambda wd: setattr(wd.opt, "state", dict(wd.opt.state, step=value))

    for label, value, error, match in (
        ("a string", "7", TypeError, r"state\['step'\] must be a step count"),
        ("a float", 1.5, TypeError, r"state\['step'\] must be a step count"),
        ("negative", np.array(-1, np.int64), ValueError, r"state\['step'\] must be >= 0"),
        ("a vector", np.zeros(3, np.uint64), TypeError, r"state\['step'\] must be a step"),
    ):
        case(f"{backend}: state step {label}", single, with_step(value), error, match)
    case(
        f"{backend}: state learning_rate nan",
        single,
        lambda wd: setattr(wd.opt, "state", dict(wd.opt.state, learning_rate=np.float32("nan"))),
        ValueError,
        r"state\['learning_rate'\] must be finite",
    )
    case(
        f"{backend}: state without step",
        single,
        lambda wd: setattr(wd.opt, "state", {k: v for k, v in wd.opt.state.items() if k != "step"}),
        ValueError,
        r"missing 'step'",
    )
    case(f"{backend}: state not a dict", single, lambda wd: setattr(wd.opt, "state", [1]), TypeError, r"must be a dict")
    case(
        f"{backend}: slot of the wrong shape",
        single,
        lambda wd: setattr(
            wd.opt,
            "state",
            dict(wd.opt.state, b={"m": make(np.ones(5), wd.backend), "v": make(np.ones(4), wd.backend)}),
        ),
        ValueError,
        r"slot 'm' of 'b' is float32\[5\]; the parameter needs float32\[4\]",
    )
    case(
        f"{backend}: slot of the wrong dtype",
        single,
        lambda wd: setattr(
            wd.opt,
            "state",
            dict(wd.opt.state, b={"m": make(np.ones(4), wd.backend, "float16"), "v": make(np.ones(4), wd.backend)}),
        ),
        ValueError,
        r"slot 'm' of 'b' is float16\[4\]; the parameter needs float32\[4\]",
    )
    case(
        f"{backend}: slots that are not arrays",
        single,
        lambda wd: setattr(wd.opt, "state", dict(wd.opt.state, b={"m": [0.0] * 4, "v": [0.0] * 4})),
        TypeError,
        r"state of 'b' must be a dict of arrays",
    )
    case(
        f"{backend}: Adam's state given to SGD",
        multi,
        adam_state_into_sgd,
        ValueError,
        r"states\[2\]: SGD.state has slots for 'layers\.0\.w'",
    )
    case(
        f"{backend}: children's states swapped",
        multi,
        lambda wd: setattr(wd.opt, "state", {"states": wd.opt.state["states"][::-1]}),
        ValueError,
        r"states\[0\]: Adam.state has slots for 'b'",
    )
    case(
        f"{backend}: one state for three children",
        multi,
        lambda wd: setattr(wd.opt, "state", {"states": wd.opt.state["states"][:1]}),
        ValueError,
        r"3 optimizers but the state holds 1 states",
    )
    case(
        f"{backend}: a bad third child state",
        multi,
        lambda wd: setattr(wd.opt, "state", {"states": wd.opt.state["states"][:2] + [{"step": "x"}]}),
        (TypeError, ValueError),
        r"states\[2\]",
    )


# ------------------------------------------------------------------------------ routing
for backend in [b for b in BACKENDS if b != "jax"]:
    routed = {"filters": [lambda path, w: path.startswith("layers")]}
    for label, kwargs, value, error, match in (
        (
            "a filter that raises",
            {"filters": [lambda path, w: 1 / 0 if path == "extra" else path == "w"]},
            np.ones((2, 2)),
            RoutingError,
            r"filters\[0\] \(<lambda>\) raised ZeroDivisionError.*on 'extra'",
        ),
        (
            "a filter that returns a bool array",
            {"filters": [lambda path, w: np.ones(2, bool) if path == "extra" else path == "w"]},
            np.ones(2),
            RoutingError,
            r"a filter must return a bool, got ndarray of shape",
        ),
        (
            "an unmatched parameter with on_unmatched='error'",
            dict(routed, on_unmatched="error"),
            np.ones(2),
            RoutingError,
            r"'extra' is accepted by no filter",
        ),
        (
            "Muon given a vector with guards='error'",
            {"filters": [lambda path, w: True], "guards": "error"},
            np.ones(2),
            RoutingError,
            r"'extra'.*Muon",
        ),
    ):
        if label.startswith("an unmatched") or label.startswith("Muon"):

            def make_world(kwargs=kwargs, backend=backend):
                wd = World("multi", backend)
                wd.opt = optim.MultiOptimizer([optim.Adam(0.02), optim.SGD(0.1)], [lambda path, w: path != "extra"])
                wd.opt.update(wd.params, wd.grads())
                wd.opt.router.on_unmatched = kwargs.get("on_unmatched", "fallback")
                if "guards" in kwargs:
                    wd.opt = optim.MultiOptimizer(
                        [optim.Muon(0.02), optim.SGD(0.1)], [lambda path, w: path == "extra"], guards="error"
                    )
                    wd.opt.update(wd.params, {k: v for k, v in wd.grads().items()})
                return wd

            act = (
                lambda wd, value=value: wd.params.__setitem__("extra", make(value, wd.backend)),
                lambda wd: wd.opt.update(wd.params, wd.grads()),
            )
        else:

            def make_world(kwargs=kwargs, backend=backend):
                wd = World("multi", backend)
                wd.opt = optim.MultiOptimizer([optim.Adam(0.02), optim.SGD(0.1)], **kwargs)
                wd.opt.update(wd.params, wd.grads())
                return wd

            act = (
                lambda wd, value=value: wd.params.__setitem__("extra", make(value, wd.backend)),
                lambda wd: wd.opt.update(wd.params, wd.grads()),
            )
        case(f"{backend}: routing, {label}", make_world, act, error, match)
    multi = world("multi", backend)
    case(
        f"{backend}: reroute to an unknown optimizer",
        multi,
        lambda wd: wd.opt.reroute("b", "Lion"),
        IndexError,
        r"there is no optimizer 'Lion'",
    )
    case(
        f"{backend}: reroute with an unknown state mode",
        multi,
        lambda wd: wd.opt.reroute("b", 0, state="keep"),
        ValueError,
        r"state must be 'reset' or 'carry', got 'keep'",
    )
    case(
        f"{backend}: freeze an unknown path",
        multi,
        lambda wd: wd.opt.freeze("nowhere"),
        KeyError,
        r"no known parameter 'nowhere'",
    )


# ------------------------------------------------------------------------------ checkpoints
def crafted(edit, backend, kind="multi"):
    """Load a file made from a valid save by ``edit(tensors, metadata)``, written with a valid checksum."""

    def act(wd):
        import tempfile

        source = World(kind, "numpy")
        tensors, metadata = checkpoint.to_flat(source.opt)
        tensors = {k: files.as_numpy(v).copy() for k, v in tensors.items()}
        edit(tensors, metadata)
        with tempfile.TemporaryDirectory() as folder:
            path = f"{folder}/crafted.safetensors"
            files.write(path, tensors, metadata)
            checkpoint.load(wd.opt, path, params=wd.params)

    return act


def raw(write, backend):
    def act(wd):
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = f"{folder}/bad.safetensors"
            write(path)
            checkpoint.load(wd.opt, path, params=wd.params)

    return act


def deep_header(path):
    from safetensors.numpy import save_file

    save_file({"x": np.ones(1, np.float32)}, path, metadata={files.METADATA_KEY: "[" * 50000 + "]" * 50000})


def truncated(path):
    source = World("multi", "numpy")
    checkpoint.save(source.opt, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def flipped(path):
    source = World("multi", "numpy")
    checkpoint.save(source.opt, path)
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0x10
    open(path, "wb").write(bytes(data))


def setkey(key, value):
    return lambda t, m: t.__setitem__(key, value)


def setmeta(*path_value):
    *path, value = path_value

    def edit(t, m):
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def route_b(route, shape):
    """An edit that records parameter ``b`` (of ``shape``) as routed to ``route``."""
    path = {"keys": ["b"], "shape": shape, "dtype": "float32", "route": route, "flags": ["rerouted"]}
    group = {"position": [], "names": ["Adam", "AdamW", "SGD"], "changes": [], "paths": [path]}
    return lambda t, m: m.__setitem__("routing", [group])


CHECKPOINT_CASES = (
    ("step of shape (3,)", setkey("@Adam/step", np.zeros(3, np.uint64)), r"'@Adam/step' has shape \(3,\)"),
    ("step as a float", setkey("@Adam/step", np.float32(2)), r"'@Adam/step' is float32; a step count is an integer"),
    ("negative step", setkey("@Adam/step", np.int64(-3)), r"'@Adam/step' is -3; a step count is >= 0"),
    (
        "learning rate as an integer",
        setkey("@Adam/learning_rate", np.int32(1)),
        r"'@Adam/learning_rate' is int32; a state scalar is one of",
    ),
    (
        "learning rate of shape (2,)",
        setkey("@Adam/learning_rate", np.ones(2, np.float32)),
        r"'@Adam/learning_rate' has shape \(2,\)",
    ),
    ("learning rate NaN", setkey("@Adam/learning_rate", np.float32("nan")), r"'@Adam/learning_rate' is nan"),
    (
        "an unknown whole-model key",
        setkey("#momentum_of_everything", np.ones(1, np.float32)),
        r"'#momentum_of_everything' is not whole-model state",
    ),
    ("an unknown scalar", setkey("@Adam/beta_7", np.float32(1)), r"Adam 'Adam' has no state scalar 'beta_7'"),
    ("a tensor of no parameter", setkey("ghost/m", np.ones(2, np.float32)), r"'ghost/m' is not listed in the metadata"),
    ("a slot stored with another shape", setkey("b/v", np.ones(5, np.float32)), r"'b/v' is stored as float32\[5\]"),
    ("parameters is a list", setmeta("parameters", []), r"'parameters': must be a dict"),
    (
        "an optimizer name that is a number",
        setmeta("optimizers", 0, "name", 3),
        r"'optimizers\[0\]\.name': must be a string",
    ),
    ("whole_model counter as a string", setmeta("whole_model", {"micro_step": "1"}), r"'whole_model\.micro_step'"),
    ("an unknown metadata field", setmeta("mystery", 1), r"'mystery': is not a field"),
    (
        "a slot dtype that is not a float",
        setmeta("parameters", "b", "slots", "v", "dtype", "int32"),
        r"'parameters\.b\.slots\.v\.dtype': must be one of",
    ),
    ("an owner that is no optimizer", setmeta("parameters", "b", "owner", "Nobody"), r"'parameters\.b\.owner'"),
    ("format version from the future", setmeta("format_version", 7), r"checkpoint format 7 is newer"),
    ("metadata step disagrees with the tensors", setmeta("step", 99), r"the metadata's 'step' is 99"),
    (
        "routing to an optimizer that does not exist",
        route_b("Lion", shape=[4]),
        r"'routing\[0\]\.paths\[0\]\.route': 'Lion' is not one of",
    ),
    (
        "routing of a parameter with another shape",
        route_b("Adam", shape=[9]),
        r"'b' is float32\[9\] in the checkpoint but float32\[4\] now",
    ),
    (
        "a hyper-parameter that differs",
        setmeta("optimizers", 2, "hyperparameters", "momentum", 0.5),
        r"momentum is 0\.5 in the checkpoint, 0\.9 now",
    ),
)

for backend in [b for b in BACKENDS if b != "jax"]:
    for label, edit, match in CHECKPOINT_CASES:
        case(
            f"{backend}: checkpoint, {label}",
            world("multi", backend),
            crafted(edit, backend),
            checkpoint.CheckpointError,
            match,
        )
    for label, write, match in (
        ("metadata nested 50,000 deep", deep_header, r"nested too deeply"),
        ("truncated", truncated, r"not a readable safetensors file"),
        ("one bit flipped", flipped, r"checksum mismatch|not a readable"),
    ):
        case(
            f"{backend}: checkpoint file {label}",
            world("multi", backend),
            raw(write, backend),
            checkpoint.CheckpointError,
            match,
        )


if available("torch"):

    def adapter_world():
        import torch

        wd = World("multi", "torch")
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        wd.adapter = optim.torch.Optimizer(model, wd.opt) if hasattr(optim, "torch") else None
        import treeopt.torch as tt

        wd.opt = optim.MultiOptimizer([optim.Adam(1e-2), optim.SGD(0.1)], [lambda path, w: w.ndim == 2])
        wd.adapter = tt.Optimizer(model, wd.opt)
        model(torch.ones(1, 4)).sum().backward()
        wd.adapter.step()
        wd.params = dict(model.named_parameters())
        return wd

    for label, value, match in (
        ("None", None, r"expects a dict, got NoneType"),
        ("an empty dict", {}, r"not a treeopt\.torch state dict"),
        ("tensors that are not a mapping", {"tensors": 1, "metadata": {}}, r"tensors must be a mapping|not a treeopt"),
        ("metadata of another format", {"tensors": {}, "metadata": {"format": "x"}}, r"format 'x'"),
        (
            "torch layout without treeopt metadata",
            {"state": {}, "param_groups": [{"params": [0]}]},
            r"treeopt_metadata",
        ),
    ):
        case(
            f"torch adapter: load_state_dict of {label}",
            adapter_world,
            lambda wd, value=value: wd.adapter.load_state_dict(value),
            (checkpoint.CheckpointError, TypeError),
            match,
        )


# ------------------------------------------------------------------------------ faults
class Flaky(optim.Optimizer):
    """A custom optimizer (init_single / apply_single, as in mlx.optimizers) that fails on demand."""

    fail = [None]

    def init_single(self, parameter, state):
        if self.fail[0] == "init":
            raise MemoryError("no memory for the slots")
        state["count"] = parameter * 0

    def apply_single(self, gradient, parameter, state):
        state["count"] = state["count"] + 1
        if self.fail[0] == "apply" and parameter.shape == (4, 4):
            raise FloatingPointError("the update overflowed")
        return parameter - 0.1 * gradient


def flaky_world():
    wd = World("single", "numpy")
    wd.opt = Flaky()
    wd.opt.state["learning_rate"] = np.float32(0.1)
    Flaky.fail[0] = None
    wd.step(wd.grads())
    return wd


def flaky(mode, new_parameter=False):
    def arrange(wd):
        if new_parameter:
            wd.params["late"] = np.ones(3, np.float32)

    def act(wd):
        Flaky.fail[0] = mode
        try:
            wd.step(wd.grads())
        finally:
            Flaky.fail[0] = None

    return arrange, act


case(
    "numpy: custom apply_single fails on the third parameter",
    flaky_world,
    flaky("apply"),
    FloatingPointError,
    r"the update overflowed",
)
case(
    "numpy: custom init_single fails for a new parameter",
    flaky_world,
    flaky("init", True),
    MemoryError,
    r"no memory for the slots",
)


def muon_world(backend, takes, **options):
    """``Muon(0.02, **options)`` for the parameters ``takes`` accepts, Adam for the rest, after two steps."""

    def make_world():
        wd = World("single", backend)
        wd.opt = optim.MultiOptimizer([optim.Muon(0.02, **options), optim.Adam(1e-2)], [takes])
        for _ in range(2):
            wd.step(wd.grads())
        return wd

    return make_world


def muon_blocks_world(backend):
    """Muon with NorMuon and a QKV-like split on the layers' (4, 4) matrices."""
    return muon_world(backend, lambda path, w: path.startswith("layers"), split_sizes=(2, 2), normuon=True)


for backend in BACKENDS:
    case(
        f"{backend}: Muon blocks that do not fit a new matrix",
        muon_blocks_world(backend),
        (lambda wd: wd.params["layers"].append(make(np.ones((5, 4)), wd.backend)), lambda wd: wd.step(wd.grads())),
        ValueError,
        r"Muon split_sizes=\(2, 2\) do not sum to the 5 outputs of a weight of shape \(5, 4\)",
    )


def muon_views_world(backend):
    """NorMuon (one moment per output) on ``w`` (3 outputs, 4 inputs) and the layers."""
    return muon_world(backend, lambda path, w: path == "w" or path.startswith("layers"), normuon="output")


for backend in BACKENDS:
    case(
        f"{backend}: a layout declared after steps for a matrix whose moments were kept per output",
        muon_views_world(backend),
        (lambda wd: wd.opt.router.declare_options({"w": {"layout": "in_out"}}), lambda wd: wd.step(wd.grads())),
        ParameterError,
        r"slot 'second_moment' of 'w' has shape \(3,\), expected \(4,\) for a parameter of shape \(3, 4\) "
        r"read with layout=in_out",
    )
    case(
        f"{backend}: heads declared after steps that do not divide a matrix's outputs",
        muon_views_world(backend),
        (lambda wd: wd.opt.router.declare_options({"layers.1.w": {"num_heads": 3}}), lambda wd: wd.step(wd.grads())),
        ValueError,
        r"Muon num_heads=3 does not divide the 4 outputs of a weight of shape \(4, 4\)",
    )


def tuple_world():
    wd = World("single", "numpy")
    wd.params = (np.ones(3, np.float32), np.ones(2, np.float32))
    wd.opt = optim.SGD(0.1)
    wd.opt.update(wd.params, (np.ones(3, np.float32), np.ones(2, np.float32)))
    return wd


def read_only_in_tuple(wd):
    wd.opt.update(wd.params, (np.ones(3, np.float32), np.ones(2, np.float32)))


case(
    "numpy: a read-only parameter in a root tuple",
    tuple_world,
    (lambda wd: setattr(wd.params[1].flags, "writeable", False), read_only_in_tuple),
    TypeError,
    r"cannot update '1' inside a tuple at the root",
)


def deep_world():
    wd = World("single", "numpy")
    depth = 300
    params = grads = None
    params, grads = np.ones(2, np.float32), np.ones(2, np.float32)
    for _ in range(depth):
        params, grads = {"x": params}, {"x": grads}
    wd.opt = optim.SGD(0.1)
    wd.params, wd.deep_grads = params, grads
    return wd


def deep_step(wd):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        wd.opt.update(wd.params, wd.deep_grads)
    finally:
        sys.setrecursionlimit(limit)


case(
    "numpy: a tree too deep for the recursion limit",
    deep_world,
    deep_step,
    RecursionError,
    r"the tree is 300 levels deep.*nothing was changed",
)

if available("torch"):

    def meta_gradient(wd):
        import torch

        grads = wd.grads()
        grads["b"] = torch.ones(4, device="meta")
        wd.step(grads)

    for kind in ("single", "multi"):
        case(
            f"torch-{kind}: a gradient on another device",
            world(kind, "torch"),
            meta_gradient,
            ParameterError,
            r"gradient at 'b' is on meta but the parameter is on cpu",
        )

        def rebound(wd):
            wd.params["b"].data = __import__("torch").ones(6)

        case(
            f"torch-{kind}: p.data rebound to another shape",
            world(kind, "torch"),
            (rebound, lambda wd: wd.step(wd.grads())),
            ParameterError,
            r"slot '\w+' of 'b' has shape \(4,\), expected \(6,\)",
        )


# ------------------------------------------------------------------------------ kinds and routing checks
for backend in BACKENDS:
    case(
        f"{backend}-multi: declare_kinds with a kind that is not a name",
        world("multi", backend),
        lambda wd: wd.opt.declare_kinds({"w": "hidden", "layers.0.w": 3}),
        TypeError,
        r"module kinds map a dotted path to a kind name or names, got 'layers.0.w': 3",
    )
    case(
        f"{backend}-multi: declare_kinds(replace=True) with a path that is not a string",
        world("multi", backend),
        lambda wd: wd.opt.declare_kinds({("w",): "output"}, replace=True),
        TypeError,
        r"got \('w',\): 'output'",
    )

    def strict_shape_only(wd):
        strict = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [filters.is_hidden_matrix], guards="error")
        strict.plan({"w": wd.params["w"]})

    case(
        f"{backend}-multi: a matrix only its number of dimensions routes, guards='error'",
        world("multi", backend),
        strict_shape_only,
        RoutingError,
        r"'w' went to Muon by its number of dimensions alone.*Muon if it is a hidden matrix, AdamW if",
    )
    case(
        f"{backend}-multi: declare_options with an option that is not a dict",
        world("multi", backend),
        lambda wd: wd.opt.router.declare_options({"w": "in_out"}),
        TypeError,
        r"options map a dotted path to \{option: value\}, got 'w': 'in_out'",
    )

if available("jax"):
    try:
        from flax import nnx
    except ImportError:
        nnx = None
    if nnx is not None:

        def plan_of_nnx_state(wd):
            wd.opt.plan(nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Param))

        case(
            "jax-multi: a MultiOptimizer's own plan() given an nnx.State",
            world("multi", "jax"),
            plan_of_nnx_state,
            TypeError,
            r"expected a tree \(dict, list or tuple\) of arrays, got State \(a JAX pytree: treeopt.jax.init",
        )


# ============================================================================== torch surfaces and resume
# What a user of treeopt.torch touches beside the step: param_groups, add_param_group, the
# state view, sparse gradients, torch-layout state dicts, names the format reserves.
if available("torch"):
    import torch

    import treeopt.torch as treeopt_torch

    def hidden(name, param):
        return name in ("1.weight", "2.weight")

    class TorchWorld:
        """An embedding, two hidden matrices (Muon) and a head (AdamW), after two steps."""

        def __init__(self, schedule=False):
            torch.manual_seed(0)
            self.model = torch.nn.Sequential(
                torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 10)
            )
            adamw_lr = optim.cosine_decay(3e-4, 100) if schedule else 3e-4
            self.opt = optim.MultiOptimizer(
                [optim.Muon(0.02), optim.AdamW(adamw_lr)], [hidden], names=["muon", "adamw"]
            )
            self.adapter = treeopt_torch.Optimizer(self.model, self.opt)
            self.params = dict(self.model.named_parameters())
            for _ in range(2):
                self.backward()
                self.adapter.step()
                self.adapter.zero_grad()

        def backward(self):
            self.model(torch.arange(10)).square().mean().backward()

    def torch_world(**options):
        return lambda: TorchWorld(**options)

    def edited(group, key, value):
        """The situation: gradients, then an edit of ``param_groups[group][key]``; the act: a step."""

        def arrange(wd):
            wd.backward()
            wd.adapter.param_groups[group][key] = value

        return arrange, lambda wd: wd.adapter.step()

    for group, key, value, error, match in (
        (1, "eps", -1e-3, ValueError, r"param_groups\[1\] \(adamw\)\['eps'\]: AdamW epsilon should be >=0, -0\.001"),
        (1, "weight_decay", -5.0, ValueError, r"param_groups\[1\] \(adamw\)\['weight_decay'\]: .*should be >=0"),
        (
            0,
            "momentum",
            1.5,
            ValueError,
            r"param_groups\[0\] \(muon\)\['momentum'\]: Muon momentum should be in \[0, 1\)",
        ),
        (0, "momentum", -0.5, ValueError, r"param_groups\[0\] \(muon\)\['momentum'\]: Muon momentum should be in"),
        (0, "ns_steps", 2.5, ValueError, r"param_groups\[0\] \(muon\)\['ns_steps'\] must be an integer, got 2\.5"),
        (1, "betas", "0.9", ValueError, r"param_groups\[1\] \(adamw\)\['betas'\] must be 2 numbers, got '0\.9'"),
        (1, "betas", 0.9, ValueError, r"param_groups\[1\] \(adamw\)\['betas'\] must be 2 numbers, got 0\.9"),
        (1, "betas", (0.9, 1.5), ValueError, r"\['betas'\]: AdamW beta2 should be in \[0, 1\), 1\.5"),
        (1, "lr", -1.0, ValueError, r"param_groups\[1\] \(adamw\)\['lr'\] must be a finite number >= 0, got -1\.0"),
        (1, "lr", "fast", ValueError, r"\['lr'\] must be a finite number >= 0, got 'fast'"),
        (0, "nesterov", 0.5, ValueError, r"param_groups\[0\] \(muon\)\['nesterov'\] must be True or False, got 0\.5"),
        (0, "name", "other", ValueError, r"param_groups\[0\]\['name'\] is the name of treeopt's group 'muon'"),
        (1, "params", [], ValueError, r"param_groups\[1\] \(adamw\)\['params'\] was changed by hand.*add_param_group"),
    ):
        case(
            f"torch adapter: param_groups[{group}][{key!r}] = {value!r}",
            torch_world(),
            edited(group, key, value),
            error,
            match,
        )

    def removed(group, key):
        def arrange(wd):
            wd.backward()
            del wd.adapter.param_groups[group][key]

        return arrange, lambda wd: wd.adapter.step()

    for group, key in ((0, "lr"), (1, "betas")):
        case(
            f"torch adapter: del param_groups[{group}][{key!r}]",
            torch_world(),
            removed(group, key),
            KeyError,
            rf"'{key}'",
        )

    def appended_param(wd):
        wd.backward()
        wd.adapter.param_groups[1]["params"].append(torch.nn.Parameter(torch.ones(3)))

    case(
        "torch adapter: a tensor appended to a group's params by hand",
        torch_world(),
        (appended_param, lambda wd: wd.adapter.step()),
        ValueError,
        r"param_groups\[1\] \(adamw\)\['params'\] was changed by hand.*add_param_group",
    )
    for label, act in (
        ("del param_groups[0]", lambda wd: wd.adapter.param_groups.__delitem__(0)),
        ("param_groups.append(...)", lambda wd: wd.adapter.param_groups.append({"params": [torch.ones(3)], "lr": 0.1})),
        ("param_groups.pop()", lambda wd: wd.adapter.param_groups.pop()),
        ("param_groups.insert(...)", lambda wd: wd.adapter.param_groups.insert(0, {"params": []})),
        ("param_groups.reverse()", lambda wd: wd.adapter.param_groups.reverse()),
        ("param_groups[0] = another dict", lambda wd: wd.adapter.param_groups.__setitem__(0, {"params": []})),
        ("param_groups = one group", lambda wd: setattr(wd.adapter, "param_groups", wd.adapter.param_groups[:1])),
        (
            "param_groups = the groups reordered",
            lambda wd: setattr(wd.adapter, "param_groups", wd.adapter.param_groups[::-1]),
        ),
    ):
        case(
            f"torch adapter: {label}",
            torch_world(),
            act,
            (TypeError, ValueError),
            r"one group per treeopt optimizer.*add_param_group",
        )

    def add_group(entries, **keys):
        return lambda wd: wd.adapter.add_param_group(dict({"params": entries(wd)}, **keys))

    lora = torch.nn.Parameter(torch.ones(3))
    for label, entries, match in (
        (
            "the same tensor twice",
            lambda wd: [("lora.a", lora), ("lora.b", lora)],
            r"'lora\.b' is the tensor of 'lora\.a'",
        ),
        (
            "a tensor of the model under another name",
            lambda wd: [("lora.a", wd.params["1.weight"])],
            r"'lora\.a' is the tensor of '1\.weight'",
        ),
        (
            "a name already taken",
            lambda wd: [("1.weight", torch.nn.Parameter(torch.ones(3)))],
            r"'1\.weight' is already in group 'muon'",
        ),
    ):
        case(f"torch adapter: add_param_group with {label}", torch_world(), add_group(entries), ValueError, match)

    def sparse_gradient(name):
        def arrange(wd):
            wd.backward()
            wd.params[name].grad = wd.params[name].grad.to_sparse()

        return arrange, lambda wd: wd.adapter.step()

    for name, group in (("1.weight", "Muon"), ("3.weight", "AdamW"), ("0.weight", "AdamW")):
        case(
            f"torch adapter: a sparse gradient for {group}'s {name}",
            torch_world(),
            sparse_gradient(name),
            TypeError,
            rf"the gradient of '{re.escape(name)}' is sparse \(torch\.sparse_coo\)",
        )

    def state_assignment(value_of):
        return lambda wd: wd.adapter.state.__setitem__(wd.params["3.weight"], value_of(wd))

    def slots_of(wd, **replace):
        slots = {k: torch.full_like(v, 7.0) for k, v in wd.adapter.state["3.weight"].items()}
        slots.update(replace)
        return slots

    for label, value_of, error, match in (
        (
            "a NumPy array for one slot",
            lambda wd: slots_of(wd, v=np.zeros((10, 8), np.float32)),
            TypeError,
            r"slot 'v' of '3\.weight' must be a torch\.Tensor, got ndarray",
        ),
        (
            "a slot of another dtype",
            lambda wd: slots_of(wd, v=torch.zeros(10, 8, dtype=torch.float64)),
            ValueError,
            r"slot 'v' of '3\.weight' is torch\.float64\[10, 8\]; the slot is torch\.float32\[10, 8\]",
        ),
        (
            "a slot of another shape",
            lambda wd: slots_of(wd, v=torch.zeros(8, 10)),
            ValueError,
            r"slot 'v' of '3\.weight' is torch\.float32\[8, 10\]; the slot is torch\.float32\[10, 8\]",
        ),
        (
            "a slot missing",
            lambda wd: {"m": torch.zeros(10, 8)},
            ValueError,
            r"'3\.weight' has slots \['m', 'v'\], got \['m'\]",
        ),
        ("not a dict", lambda wd: [torch.zeros(10, 8)], TypeError, r"state of '3\.weight' must be a dict"),
    ):
        case(f"torch adapter: state[p] = {label}", torch_world(), state_assignment(value_of), error, match)

    def load_edited(edit, strict=True):
        def act(wd):
            source = TorchWorld()
            saved = source.adapter.state_dict()
            edit(saved)
            wd.adapter.load_state_dict(saved, strict=strict)

        return act

    def set_group(index, key, value):
        return lambda saved: saved["param_groups"][index].__setitem__(key, value)

    for label, edit, match in (
        (
            "momentum 1.5 in a saved group",
            set_group(0, "momentum", 1.5),
            r"muon.*'momentum'.*Muon momentum should be in \[0, 1\)",
        ),
        (
            "lr -1 in a saved group",
            set_group(1, "lr", -1.0),
            r"param_groups \(adamw\)\['lr'\] must be a finite number >= 0, got -1\.0",
        ),
        (
            "betas as a string in a saved group",
            set_group(1, "betas", "0.9"),
            r"param_groups \(adamw\)\['betas'\] must be 2 numbers, got '0\.9'",
        ),
    ):
        for strict in (True, False):
            case(
                f"torch adapter: load_state_dict with {label} (strict={strict})",
                torch_world(),
                load_edited(edit, strict),
                checkpoint.CheckpointError,
                match,
            )

    def pending_edit(wd):
        wd.adapter.param_groups[0]["momentum"] = 0.9
        wd.adapter.param_groups[1]["lr"] = 1e-3

    case(
        "torch adapter: edits pending, then a load_state_dict that fails",
        torch_world(),
        (pending_edit, load_edited(set_group(0, "momentum", 1.5))),
        checkpoint.CheckpointError,
        r"muon.*'momentum'.*Muon momentum should be in \[0, 1\)",
    )

    def failing_step(wd):
        wd.backward()
        wd.adapter.param_groups[0]["momentum"] = 0.9
        wd.adapter.param_groups[1]["lr"] = 1e-3
        wd.params["3.bias"].grad.data = torch.ones(12)  # past torch's checks of .grad

    case(
        "torch adapter: edits pending, then a step that fails in treeopt",
        torch_world(),
        (failing_step, lambda wd: wd.adapter.step()),
        ParameterError,
        r"'3\.bias' has shape \(12,\) but the parameter has shape \(10,\)",
    )

    def scheduled_lr_edit(wd):
        source = TorchWorld(schedule=True)
        saved = source.adapter.state_dict()
        saved["param_groups"][1]["lr"] = 1e-5
        wd.adapter.load_state_dict(saved)

    case(
        "torch adapter: load_state_dict with a scheduled lr edited in the dict",
        torch_world(schedule=True),
        scheduled_lr_edit,
        checkpoint.CheckpointError,
        r"adamw.*lr was changed to 1e-05.*treeopt schedule",
    )


# ------------------------------------------------------------------------------ compact state (state_dtype)
def with_slot(group, path, slot, value):
    """Assign the state with the slots of ``group``'s parameter ``path`` changed: ``slot``
    set to ``value(backend)``, or removed (``value`` None); then step."""

    def act(wd):
        state = optim.tree.tree_map(lambda x: x, wd.opt.state)  # new containers, the same arrays
        node = state["states"][group]
        for key in path.split("."):
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is None:
            node.pop(slot)
        else:
            node[slot] = value(wd.backend)
        wd.opt.state = state
        wd.step(wd.grads())

    return act


for backend in [b for b in BACKENDS if b != "jax"]:
    compact = world("compact", backend)
    case(
        f"{backend}: int8 codes replaced by float32",
        compact,
        with_slot(0, "layers.0.w", "m", lambda b: make(np.zeros((4, 4)), b)),
        ValueError,
        r"Adam.state: slot 'm' of 'layers.0.w' is float32\[4, 4\]; its state_dtype stores it as int8\[4, 4\]",
    )
    case(
        f"{backend}: int8 scales of another block grid",
        compact,
        with_slot(0, "layers.1.w", "v_scale", lambda b: make(np.zeros((4, 2)), b)),
        ValueError,
        r"slot 'v_scale' of 'layers.1.w' is float32\[4, 2\]; its state_dtype stores it as float32\[4, 1\]",
    )
    case(
        f"{backend}: int8 codes without their scales",
        compact,
        with_slot(0, "layers.1.w", "v_scale", None),
        ValueError,
        r"Adam.state: 'layers.1.w' has slots \['m', 'm_scale', 'v'\], and Adam keeps \['m', 'm_scale', 'v', 'v_scale'\] "
        r"\(.*another state_dtype\?\)",
    )
    case(
        f"{backend}: bfloat16 slot assigned as float32",
        compact,
        with_slot(1, "w", "m", lambda b: make(np.zeros((3, 4)), b)),
        ValueError,
        r"AdamW.state: slot 'm' of 'w' is float32\[3, 4\]; its state_dtype stores it as bfloat16\[3, 4\]",
    )

    def scale_edit(t, m):
        t["layers.0.w/m_scale"] = np.zeros((2, 1), np.float32)
        m["parameters"]["layers.0.w"]["slots"]["m_scale"] = {"shape": [2, 1], "dtype": "float32"}

    case(
        f"{backend}: checkpoint int8 scales that do not fit their codes",
        world("multi", backend),  # the file is of another state_dtype: it is read back first
        crafted(scale_edit, backend, kind="compact"),
        checkpoint.CheckpointError,
        r"layers.0.w/m: 'm_scale' is float32\[2, 1\]; codes of shape \[4, 4\] in blocks of 256 need float32\[4, 1\]",
    )

    def codes_edit(t, m):
        t["layers.1.w/v"] = np.zeros((4, 4), np.int16)
        m["parameters"]["layers.1.w"]["slots"]["v"] = {"shape": [4, 4], "dtype": "int16"}

    case(
        f"{backend}: checkpoint codes of a dtype no format has",
        world("compact", backend),
        crafted(codes_edit, backend, kind="compact"),
        checkpoint.CheckpointError,
        r"'parameters.layers.1.w.slots.v.dtype'.*must be one of .*int8, uint8, got 'int16'",
    )
    case(
        f"{backend}: checkpoint state_dtype that is not one",
        world("compact", backend),
        crafted(
            setmeta("optimizers", 0, "state_dtype", {"dtype": "int4", "seed": 0, "block": 256, "min_size": 0}),
            backend,
            kind="compact",
        ),
        checkpoint.CheckpointError,
        r"'optimizers\[0\].state_dtype'.*state_dtype should be None or one of .*'int4'",
    )


# ------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_raises_a_clear_error_and_changes_nothing(bad):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wd = bad.world()
        arrange, act = bad.act if isinstance(bad.act, tuple) else (None, bad.act)
        if arrange is not None:  # the situation (a resized layer, a new parameter...), then the step
            arrange(wd)
    before = fingerprint(wd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(bad.error, match=bad.match):
            act(wd)
    assert fingerprint(wd) == before, "the optimizer or the parameters changed"


def test_the_catalogue_is_large_enough():
    """docs/reliability.md quotes this count."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    print(f"\n{len(ids)} bad inputs and faults in the catalogue")
    assert len(ids) >= 120


# ------------------------------------------------------------------------------ what must keep working
@pytest.mark.parametrize("backend", [b for b in ("numpy", "torch") if available(b)])
def test_none_gradients_after_the_first_step_skip_their_parameter(backend):
    """MoE layers: an expert with no gradient on a later step (the compiled step is planned)."""
    wd = World("multi", backend)
    state_b = fingerprint(wd)[0]
    grads = wd.grads()
    grads["b"] = None
    before_b = as_bytes(wd.params["b"])
    wd.step(grads)
    assert as_bytes(wd.params["b"]) == before_b
    assert fingerprint(wd)[0] != state_b  # the others stepped


def test_a_parameter_made_read_only_after_planning_is_replaced_not_written():
    wd = World("single", "numpy")
    held = wd.params["b"]
    copy = held.copy()
    held.flags.writeable = False
    wd.step(wd.grads())
    assert np.array_equal(held, copy) and wd.params["b"] is not held


def test_a_rule_the_compiled_loop_cannot_map_still_steps():
    """An elementwise rule calling an op the numba loop does not map: the step is taken (the
    reference path), a warning says the fast path is off, later steps match the reference."""
    from treeopt.rules import Rule

    def update(grad, param, lr):
        return (param - lr * grad * ops.rsqrt(grad * grad + lr),)

    class Odd(optim.Optimizer):
        rule = Rule("odd_rsqrt", update, lambda lr, step: {"lr": lr}, slots=())

        def __init__(self):
            super().__init__()
            self._maybe_schedule("learning_rate", 0.1)

    params = {"w": np.ones((3, 3), np.float32)}
    reference = {"w": np.ones((3, 3), np.float32)}
    opt, ref = Odd(), Odd()
    for step in range(3):
        grads = {"w": np.full((3, 3), 0.5 + step, np.float32)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.update(params, grads)
        reference = ref.apply_gradients(grads, reference)
    assert int(opt.step) == 3
    np.testing.assert_array_equal(params["w"], reference["w"])


def test_concurrent_steps_with_new_paths_lose_no_route():
    import threading

    for _ in range(5):
        opt = optim.MultiOptimizer([optim.Adam(1e-2), optim.SGD(0.1)], [lambda path, w: w.ndim == 2])

        def work(t):
            params = {f"t{t}_{i}": np.ones((4, 4) if i % 2 else 4, np.float32) for i in range(40)}
            opt.update(params, {k: np.ones_like(v) for k, v in params.items()})

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(opt.router.table()) == 160
        assert int(opt.step) == 4


def test_checkpoint_permissions_follow_the_umask(tmp_path):
    import os

    wd = World("multi", "numpy")
    for mask in (0o022, 0o002, 0o077):
        old = os.umask(mask)
        try:
            checkpoint.save(wd.opt, tmp_path / f"opt{mask}.safetensors")
        finally:
            os.umask(old)
        assert os.stat(tmp_path / f"opt{mask}.safetensors").st_mode & 0o777 == 0o666 & ~mask


def test_routing_changes_survive_a_checkpoint(tmp_path):
    wd = World("multi", "numpy")
    wd.opt.freeze("w")
    wd.opt.reroute("layers.0.w", "AdamW", state="carry")
    checkpoint.save(wd.opt, tmp_path / "opt.safetensors")
    fresh = World("multi", "numpy")
    fresh.params = tree_on(values(), "numpy")
    fresh.opt = optim.MultiOptimizer(
        [optim.Adam(1e-2), optim.AdamW(1e-2), optim.SGD(0.1, momentum=0.9)],
        [lambda path, w: path.startswith("layers"), lambda path, w: path == "w"],
    )
    assert checkpoint.load(fresh.opt, tmp_path / "opt.safetensors", params=fresh.params).ok
    assert fresh.opt.route("w") is None and fresh.opt.route("layers.0.w") == 1
    assert fresh.opt.changes == wd.opt.changes
    carried = {k: as_bytes(v) for k, v in wd.opt.optimizers[1].store.carried[("layers", 0, "w")].items()}

    loaded = fresh.opt.optimizers[1].store.slots(("layers", 0, "w"))
    assert {k: as_bytes(loaded[k]) for k in carried} == carried


def test_info_on_files_that_are_not_optimizer_checkpoints(tmp_path, capsys):
    from treeopt.checkpoint.__main__ import main

    files.write(tmp_path / "params.safetensors", {"w": np.ones(3, np.float32)}, {"format": "treeopt-demo-parameters"})
    assert main(["info", str(tmp_path / "params.safetensors")]) == 1
    assert "not an optimizer checkpoint" in " ".join(capsys.readouterr().out.split())  # folded to the width
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 1
    assert "No such file" in " ".join(capsys.readouterr().out.split())


def test_info_says_in_one_line_what_a_folder_or_another_format_is(tmp_path, capsys):
    import zipfile

    from treeopt.checkpoint.__main__ import main

    run = tmp_path / "run"  # a folder of files, as the demo's --checkpoint writes
    run.mkdir()
    world = World("single", "numpy")
    checkpoint.save(world.opt, run / "adamw.optimizer.safetensors")
    with zipfile.ZipFile(run / "adamw.model.pt", "w") as archive:  # torch.save's layout
        archive.writestr("adamw.model/data.pkl", b"")
    (run / "notes.txt").write_text("not a tensor file\n")
    expected = {
        run: "is a folder, not a checkpoint (a checkpoint saved by several ranks has a treeopt.json); the "
        "safetensors files in it: adamw.optimizer.safetensors",
        run / "adamw.model.pt": "is a PyTorch file (torch.save), not a treeopt checkpoint",
        run / "notes.txt": "is not a safetensors file",
    }
    for path, says in expected.items():
        assert main(["info", str(path)]) == 1
        out = capsys.readouterr().out
        problems = [line for line in out.splitlines() if line.startswith("problem:")]
        assert len(problems) == 1 and says in " ".join(out.split())
        assert "Traceback" not in out


def test_info_fits_the_width_and_writes_numbers_as_people_do(tmp_path, capsys):
    from treeopt.checkpoint import __main__ as info

    opt = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4, weight_decay=0.01)], [lambda p, w: w.ndim == 2])
    params = {"layer_with_a_rather_long_name": {"w": np.ones((4, 4), np.float32), "b": np.ones(4, np.float32)}}
    opt.update(
        params, {"layer_with_a_rather_long_name": {"w": np.ones((4, 4), np.float32), "b": np.ones(4, np.float32)}}
    )
    checkpoint.save(opt, tmp_path / "opt.safetensors")
    summary, problems = info.inspect(tmp_path / "opt.safetensors")
    for width in (60, 80, 120):
        info._print(summary, problems, width)
        out = capsys.readouterr().out
        assert max(map(len, out.splitlines())) <= width
        flat = " ".join(out.split())
        # the learning rates (float32 in the file) as written; every hyper-parameter in full (folded, never cut)
        assert "Muon 1 16 64 0.02 " in flat and "AdamW 1 4 32 0.0003 " in flat
        assert "momentum=0.95" in flat and "weight_decay=0.01" in flat and "betas=[0.9, 0.999]" in flat
        assert "0.0199999" not in flat and "0.000300000" not in flat and "..." not in flat


def test_saving_without_safetensors_says_how_to_install_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError("No module named 'safetensors'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(
        ModuleNotFoundError,
        match=r"pip install safetensors \(or, in a treeopt checkout, pip install -e '\.\[checkpoint\]'\)",
    ):
        checkpoint.save(World("single", "numpy").opt, tmp_path / "x.safetensors")


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("numba") is None, reason="numba is not installed")
def test_a_damaged_kernel_cache_file_only_costs_a_compile(tmp_path, monkeypatch):
    """A kernel cache file that does not parse (a half-written disk, an edit) is compiled anew
    in memory: the step is taken, with the reference numbers, and no error escapes."""
    from treeopt.kernels import numba_kernels

    monkeypatch.setenv("TREEOPT_CACHE_DIR", str(tmp_path))

    def train():
        params, reference = {"w": np.ones((8, 8), np.float32)}, {"w": np.ones((8, 8), np.float32)}
        opt, ref = optim.AdamW(1e-2), optim.AdamW(1e-2)
        for step in range(3):
            grads = {"w": np.full((8, 8), 0.1 * (step + 1), np.float32)}
            opt.update(params, grads)
            reference = ref.apply_gradients(grads, reference)
        return params["w"], reference["w"]

    numba_kernels.kernel_for.cache_clear()
    train()
    written = list((tmp_path / "kernels").glob("*.py"))
    assert written
    for path in written:
        path.write_text("def kernel(:\n")  # not Python
    numba_kernels.kernel_for.cache_clear()
    try:
        got, want = train()
    finally:
        numba_kernels.kernel_for.cache_clear()
    np.testing.assert_array_equal(got, want)
