"""treeopt in JAX: pure functions of an explicit state, and an optax adapter.

    import treeopt as optim
    import treeopt.jax

    opt = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [is_hidden_matrix])
    state = treeopt.jax.init(opt, params)

    @jax.jit
    def train_step(params, state, batch):
        grads = jax.grad(loss)(params, batch)
        return treeopt.jax.update(opt, grads, state, params)   # (new params, new state)

    tx = treeopt.jax.as_optax(opt)    # an optax.GradientTransformation: optax.chain, flax...

Any pytree works (dicts, flax ``nnx.State``, equinox modules...): its leaves are named by
their key paths joined with dots, so filters see ``params.Dense_0.kernel`` (a trailing
``.value``, as in flax nnx variables, is dropped). The state is a plain pytree of JAX arrays:
the step, the learning rate and one dict of slots per parameter, keyed by that name.
Nothing is mutated: the optimizer object only holds its configuration and routes.

Routing knows flax's and equinox's modules: :func:`init` declares what their layers are (an
embedding table, the output head, norms, convolutions, the first and last layers of a model
without an embedding; see :func:`module_kinds`), so routing and Muon's guard see them whatever
they are named.

Weights are taken to be laid out as in flax, ``(in, out)`` and conv kernels
``(kh, kw, in, out)``: a ``Muon`` without an explicit ``layout`` orthogonalises them that way
(``"in_out"``; see ``docs/muon.md``), except in an equinox module (``eqx.filter(model,
eqx.is_array)`` too), whose weights are ``(out, in)`` (``"out_in"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax

from treeopt.filters import (
    CONV,
    DEPTHWISE,
    EMBEDDING,
    HEAD,
    INPUT,
    LINEAR,
    NORM,
    OUTPUT,
    POINTWISE,
    name_says_head,
    repeated_blocks,
)
from treeopt.multi import MultiOptimizer
from treeopt.optimizer import Optimizer
from treeopt.optimizers import default_layout
from treeopt.tree import tree_flatten, tree_map
from treeopt.types import Tree

if TYPE_CHECKING:
    import optax

__all__ = [
    "init",
    "update",
    "as_optax",
    "path_of",
    "named_leaves",
    "module_kinds",
    "declare_kinds",
    "layout_of",
    "is_equinox",
    "LAYOUT",
]

#: how flax lays out its weights: the output axis last (see Muon's ``layout``)
LAYOUT = "in_out"


def path_of(key_path: Sequence[Any]) -> str:
    """The dotted name of a JAX key path: ``(DictKey('params'), DictKey('Dense_0'),
    DictKey('kernel'))`` -> ``params.Dense_0.kernel``."""
    parts = []
    for entry in key_path:
        for attribute in ("key", "idx", "name"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    if len(parts) > 1 and parts[-1] == "value" and type(key_path[-1]).__name__ == "GetAttrKey":
        parts.pop()  # flax nnx variables hold their array in .value
    return ".".join(parts)


def _flat(tree):
    """``({name: leaf}, names, treedef)``."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    names = [path_of(path) for path, _ in pairs]
    flat = {}
    for name, (_, leaf) in zip(names, pairs):
        if name in flat:
            raise ValueError(f"two leaves of the tree are both named {name!r}")
        flat[name] = leaf
    return flat, names, treedef


def named_leaves(tree: Tree) -> dict[str, Any]:
    """``{path: leaf}`` of any pytree (an ``nnx.State``, an equinox module, flax's boxed
    parameters), named by :func:`path_of`, in JAX's order: what :func:`init` routes. Leaves
    that are not arrays (an unfiltered equinox module's activation functions) are left out."""
    return {name: leaf for name, leaf in _flat(tree)[0].items() if hasattr(leaf, "shape") and hasattr(leaf, "dtype")}


def _copy_containers(state):
    """``state`` with new containers and the same arrays."""
    return tree_map(lambda leaf: leaf, state)


@contextlib.contextmanager
def _borrowed(optimizer, state, layout=LAYOUT):
    """Run ``optimizer`` on a copy of ``state`` (its containers, not its arrays), leaving the
    optimizer's own state untouched; a Muon without a ``layout`` reads weights as ``layout``."""
    stores = [member.group.store for member in optimizer.groups()]
    saved = [(store.tree, store.checked, store.backend) for store in stores]
    try:
        with default_layout(layout):  # weights are flax's (or equinox's) here, unless a Muon says otherwise
            optimizer.state = _copy_containers(state)  # checked against the parameters on use
            yield
    finally:
        for store, (own, checked, backend) in zip(stores, saved):
            store.replace(own)
            store.checked, store.backend = checked, backend


def _equinox_layers(model):
    """``[(path, module, field)]`` of an equinox module's arrays, in field order."""
    import equinox as eqx  # optional: only for an equinox model

    found = []

    def walk(node, keys, owner):
        if isinstance(node, eqx.Module):
            for field in dataclasses.fields(node):
                walk(getattr(node, field.name), keys + (field.name,), node)
        elif isinstance(node, (list, tuple)):
            for i, child in enumerate(node):
                walk(child, keys + (str(i),), owner)
        elif isinstance(node, jax.Array):
            found.append((".".join(keys), owner, keys[-1]))

    walk(model, (), None)
    return found


def is_equinox(tree: object) -> bool:
    """``tree`` is an equinox module (whose weights are ``(out, in)``)."""
    module = type(tree).__module__
    if not any(c.__module__.startswith("equinox") for c in type(tree).__mro__) and not module.startswith("equinox"):
        return False
    import equinox as eqx  # optional: only for an equinox model

    return isinstance(tree, eqx.Module)


def _kinds_of_equinox(model):
    import equinox as eqx  # optional: only for an equinox model

    kinds: dict = {}
    layers: list = []  # (path, is a linear, outputs), in field order
    norms = (eqx.nn.LayerNorm, eqx.nn.RMSNorm, eqx.nn.GroupNorm, eqx.nn.BatchNorm)
    for path, owner, field in _equinox_layers(model):
        if isinstance(owner, eqx.nn.Embedding) and field == "weight":
            kinds[path] = {EMBEDDING}
        elif isinstance(owner, norms):
            kinds[path] = {NORM}
        elif isinstance(owner, eqx.nn.Linear) and field == "weight":
            kinds[path] = {LINEAR}
            layers.append((path, True, owner.out_features))
        elif isinstance(owner, eqx.nn.Conv) and field == "weight":
            kinds[path] = _conv_kinds(getattr(owner, "groups", 1) == owner.in_channels > 1, owner.kernel_size)
            layers.append((path, False, None))
    shapes = dict(_equinox_shapes(model))
    vocabularies = [shapes[path][0] for path in kinds if EMBEDDING in kinds[path]]
    return _by_order(kinds, layers, vocabularies, {path: shapes[path] for path, _, _ in layers})


def _equinox_shapes(model):
    return [(path, tuple(getattr(node, "shape", ()))) for path, node in _flat(model)[0].items()]


def _conv_kinds(depthwise, kernel):
    kinds = {CONV}
    if depthwise:
        kinds.add(DEPTHWISE)
    elif all(k == 1 for k in kernel):
        kinds.add(POINTWISE)
    return kinds


def _by_order(kinds, layers, vocabularies, shapes):
    """The head by vocabulary (outside the blocks the model repeats: ``shapes`` of its
    layers); without an embedding, the last linear writes the output and the first other
    layer reads the input (the model's definition order). A linear layer named as an output
    layer (``head``, ``classifier``...) is the output whatever its place: an ``nnx.State``, and
    a dict that went through JAX's tree functions, are sorted by name."""
    if vocabularies:
        heads = _heads(layers, vocabularies, shapes)
        if heads:
            kinds[heads[-1]].add(HEAD)
    elif layers:
        linears = [path for path, is_linear, _ in layers if is_linear]
        named = [path for path in linears if name_says_head(path)]
        output = (named or linears or [None])[-1]
        first = next((path for path, _, _ in layers if path != output), None)
        if first is None:  # one layer: it reads the input
            kinds[layers[0][0]].add(INPUT)
        else:
            kinds[first].add(INPUT)
            if output is not None:
                kinds[output].add(OUTPUT)
    return {path: frozenset(found) for path, found in kinds.items() if found}


def _heads(layers, vocabularies, shapes):
    """The linear layers whose outputs are the largest vocabulary, outside repeated blocks."""
    repeated = repeated_blocks(shapes)
    return [
        path for path, is_linear, outputs in layers if is_linear and outputs == max(vocabularies) and not repeated(path)
    ]


def module_kinds(model: Tree) -> dict[str, frozenset[str]]:
    """What flax's and equinox's modules make of the parameters of ``model``: ``{path:
    kinds}``, paths as :func:`path_of` names them (see :mod:`treeopt.filters` for the kinds).

    ``model`` is an equinox module or an nnx module (their layers found by type), or a tree of
    parameters (linen's ``params``, an ``nnx.State``), read by the names flax gives the
    parameters of its layers: an ``Embed`` keeps its table in ``embedding``, a ``Dense``,
    ``Linear`` or ``Conv`` its weight in ``kernel`` (a convolution's has more than two axes),
    a normalisation layer its gain in ``scale``. The output head is the dense layer whose
    outputs are the largest vocabulary, outside the blocks the model repeats (of several, the
    shallowest, then the last). Without an
    embedding (a CNN, an MLP), the first layer reads the input and the last dense layer writes
    the output, in the tree's order (linen's: the order layers are called; equinox's: field
    order; an ``nnx.State``'s: sorted by name).
    """
    if is_equinox(model):
        return _kinds_of_equinox(model)
    kinds: dict = {}
    layers: list = []  # (path of the weight, is a linear, outputs), in order
    shapes: dict = {}  # of the layers: which blocks repeat
    vocabularies: list = []
    try:
        # optional: flax modules when flax is installed
        from flax import nnx
    except ImportError:
        nnx = None  # type: ignore[assignment]
    if nnx is not None and isinstance(model, nnx.Module):
        norms = (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm)
        for keys, module in nnx.iter_modules(model):
            prefix = "".join(f"{key}." for key in keys)
            if isinstance(module, nnx.Embed):
                kinds[prefix + "embedding"] = {EMBEDDING}
                vocabularies.append(module.num_embeddings)
            elif isinstance(module, nnx.Linear):
                kinds[prefix + "kernel"] = {LINEAR}
                layers.append((prefix + "kernel", True, module.out_features))
                shapes[prefix + "kernel"] = (module.in_features, module.out_features)
            elif isinstance(module, nnx.Conv):
                depthwise = module.feature_group_count == module.in_features > 1
                kinds[prefix + "kernel"] = _conv_kinds(depthwise, module.kernel_size)
                layers.append((prefix + "kernel", False, None))
                shapes[prefix + "kernel"] = (*module.kernel_size, module.in_features, module.out_features)
            elif isinstance(module, norms):
                for name in ("scale", "bias"):
                    kinds[prefix + name] = {NORM}
        return _by_order(kinds, layers, vocabularies, shapes)
    # a plain dict (linen's params) in its own order, the order layers were called; JAX's
    # flattening would sort its keys
    flat = dict(tree_flatten(model)) if type(model) is dict else _flat(model)[0]
    for name in flat:
        shape: tuple = tuple(getattr(getattr(flat[name], "value", flat[name]), "shape", ()))
        leaf = name.rsplit(".", 1)[-1]
        if len(shape) == 2 and leaf == "embedding":
            kinds[name] = {EMBEDDING}
            vocabularies.append(shape[0])
        elif leaf == "scale":
            kinds[name] = {NORM}
        elif leaf == "kernel" and len(shape) == 2:
            kinds[name] = {LINEAR}
            layers.append((name, True, shape[-1]))
            shapes[name] = shape
        elif leaf == "kernel" and len(shape) > 2:  # (*window, in / groups, out)
            kinds[name] = _conv_kinds(shape[-2] == 1 and shape[-1] > 1, shape[:-2])
            layers.append((name, False, None))
            shapes[name] = shape
    if vocabularies:  # of several vocabulary-sized layers the shallowest, then the last
        heads = _heads(layers, vocabularies, shapes)
        if heads:
            shallowest = min(path.count(".") for path in heads)
            kinds[[path for path in heads if path.count(".") == shallowest][-1]].add(HEAD)
        return {path: frozenset(found) for path, found in kinds.items() if found}
    return _by_order(kinds, layers, vocabularies, shapes)


def declare_kinds(optimizer: Optimizer, model: Tree) -> dict[str, frozenset[str]]:
    """Tell ``optimizer`` (a MultiOptimizer) what :func:`module_kinds` finds in ``model``,
    before it routes; returns the kinds. :func:`init` does it for the tree it is given."""
    kinds = module_kinds(model)
    if kinds:
        optimizer.router.declare_kinds(kinds)
    return kinds


def layout_of(params: Tree) -> str:
    """How the weights of ``params`` keep their axes: ``"out_in"`` for an equinox module
    (``Linear.weight`` is ``(out, in)``), else flax's ``"in_out"``."""
    return "out_in" if is_equinox(params) else LAYOUT


def init(optimizer: Optimizer, params: Tree) -> dict:
    """A new state for ``params``: zero slots, and the optimizer's current step and
    scalars (so a new optimizer starts at step 0). Declares the kinds of flax's modules
    (:func:`declare_kinds`) first."""
    declare_kinds(optimizer, params)
    flat, _, _ = _flat(params)
    with _borrowed(optimizer, _scalars_only(optimizer), layout_of(params)):
        optimizer.init(flat)
        return _on_mesh_of(flat.values(), _copy_containers(optimizer.state))


def _scalars_only(optimizer: Optimizer) -> dict:
    """The state of ``optimizer`` without any parameter's slots: its step and scalars (of each
    child, for a MultiOptimizer)."""
    if isinstance(optimizer, MultiOptimizer):
        return {"states": [_scalars_only(child) for child in optimizer.optimizers]}
    return {name: optimizer.scalars.value(name) for name in optimizer.scalars.names()}


def _on_mesh_of(params, state):
    """``state`` with the arrays that are on no mesh (the step, learning rates) copied to every
    device of the parameters' mesh. Slots already follow their parameters' sharding. A jitted
    step returns its scalars on the mesh: starting them there too keeps step 2 from retracing."""
    mesh = next(
        (sharding.mesh for sharding in map(_sharding, params) if isinstance(sharding, jax.sharding.NamedSharding)), None
    )
    if mesh is None or mesh.size == 1:
        return state
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(leaf):
        sharding = _sharding(leaf)
        return jax.device_put(leaf, replicated) if isinstance(sharding, jax.sharding.SingleDeviceSharding) else leaf

    return tree_map(place, state)


def _sharding(leaf):
    """A concrete array's sharding; ``None`` for a tracer or anything else."""
    if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
        return None
    return leaf.sharding


def update(optimizer: Optimizer, grads: Tree, state: dict, params: Tree) -> tuple[Tree, dict]:
    """One step, as a pure function: ``(new_params, new_state)``. Usable inside ``jax.jit``
    (the learning rate and schedules are read from ``state``, so changing them does not
    retrace). ``grads`` has ``params``' structure; a ``None`` gradient leaves its
    parameter as it is."""
    flat_params, names, treedef = _flat(params)
    flat_grads, _, _ = _flat(grads)
    with _borrowed(optimizer, state, layout_of(params)):
        new = optimizer.apply_gradients(flat_grads, flat_params)
        new_state = _copy_containers(optimizer.state)
    return jax.tree_util.tree_unflatten(treedef, [new.get(n, flat_params[n]) for n in names]), new_state


def as_optax(optimizer: Optimizer) -> optax.GradientTransformation:
    """``optimizer`` as an ``optax.GradientTransformation``.

    ``update(grads, state, params)`` returns ``new_params - params`` as the updates, so
    ``optax.apply_updates`` gives the new parameters (up to one rounding of the
    subtraction; :func:`update` gives them exactly). ``params`` is required.
    """
    # optional: only for as_optax
    import optax

    def init_fn(params):
        return init(optimizer, params)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("treeopt's optax transformation needs the parameters: tx.update(grads, state, params)")
        new_params, new_state = update(optimizer, updates, state, params)
        deltas = jax.tree_util.tree_map(
            lambda new, old: None if new is None else new - old, new_params, params, is_leaf=lambda x: x is None
        )
        return deltas, new_state

    return optax.GradientTransformation(init_fn, update_fn)
