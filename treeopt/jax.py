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

Routing knows flax's modules: :func:`init` declares each ``Embed`` table an embedding and the
``Dense``/``Linear`` that maps to its vocabulary the output head (see :func:`module_kinds`), so
``is_embedding``, ``is_head`` and Muon's guard see them whatever they are named.

Weights are taken to be laid out as in flax, ``(in, out)`` and conv kernels
``(kh, kw, in, out)``: a ``Muon`` without an explicit ``layout`` orthogonalises them that way
(``"in_out"``; see ``docs/muon.md``). For ``(out, in)`` weights (equinox), give
``Muon(..., layout="out_in")``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax

from treeopt.multi import MultiOptimizer
from treeopt.optimizer import Optimizer
from treeopt.optimizers import default_layout
from treeopt.tree import tree_map
from treeopt.types import Tree

if TYPE_CHECKING:
    import optax

__all__ = ["init", "update", "as_optax", "path_of", "module_kinds", "declare_kinds", "LAYOUT"]

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


def _copy_containers(state):
    """``state`` with new containers and the same arrays."""
    return tree_map(lambda leaf: leaf, state)


@contextlib.contextmanager
def _borrowed(optimizer, state):
    """Run ``optimizer`` on a copy of ``state`` (its containers, not its arrays), leaving the
    optimizer's own state untouched."""
    stores = [member.group.store for member in optimizer.groups()]
    saved = [(store.tree, store.checked, store.backend) for store in stores]
    try:
        with default_layout(LAYOUT):  # weights are flax's here, unless a Muon says otherwise
            optimizer.state = _copy_containers(state)  # checked against the parameters on use
            yield
    finally:
        for store, (own, checked, backend) in zip(stores, saved):
            store.replace(own)
            store.checked, store.backend = checked, backend


def _natural(path):
    """A sort key that puts ``Dense_2`` before ``Dense_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def module_kinds(model: Tree) -> dict[str, str]:
    """What flax's modules make of the parameters of ``model``: ``{path: "embedding" or
    "head"}``, paths as :func:`path_of` names them.

    ``model`` is an nnx module (its ``nnx.Embed`` and ``nnx.Linear`` are found by type) or a
    tree of parameters (linen's ``params``, an ``nnx.State``), read by the names flax gives the
    parameters of these modules: an ``Embed`` keeps its table in ``embedding``, a ``Dense`` or
    ``Linear`` its weight in ``kernel``. The output head is the dense layer whose outputs are an
    embedding's vocabulary: of several, the shallowest, then the last (``Dense_10`` after
    ``Dense_2``), so hidden layers as wide as a byte vocabulary are not taken for it.
    """
    tables, denses = [], []  # (path of the parameter, rows) and (path, outputs), in model order
    try:
        # optional: flax modules when flax is installed
        from flax import nnx
    except ImportError:
        nnx = None  # type: ignore[assignment]
    if nnx is not None and isinstance(model, nnx.Module):
        for keys, module in nnx.iter_modules(model):
            prefix = "".join(f"{key}." for key in keys)
            if isinstance(module, nnx.Embed):
                tables.append((prefix + "embedding", module.num_embeddings))
            elif isinstance(module, nnx.Linear):
                denses.append((prefix + "kernel", module.out_features))
    else:
        flat, _, _ = _flat(model)
        for name in sorted(flat, key=_natural):
            shape: tuple = tuple(getattr(flat[name], "shape", ()))
            if len(shape) == 2 and name.rsplit(".", 1)[-1] == "embedding":
                tables.append((name, shape[0]))
            elif len(shape) == 2 and name.rsplit(".", 1)[-1] == "kernel":
                denses.append((name, shape[-1]))
    kinds = {name: "embedding" for name, _ in tables}
    vocabularies = {rows for _, rows in tables}
    heads = [name for name, outputs in denses if outputs in vocabularies]
    if heads:
        shallowest = min(name.count(".") for name in heads)
        kinds[[name for name in heads if name.count(".") == shallowest][-1]] = "head"
    return kinds


def declare_kinds(optimizer: Optimizer, model: Tree) -> dict[str, str]:
    """Tell ``optimizer`` (a MultiOptimizer) what :func:`module_kinds` finds in ``model``,
    before it routes; returns the kinds. :func:`init` does it for the tree it is given."""
    kinds = module_kinds(model)
    if kinds:
        optimizer.router.declare_kinds(kinds)
    return kinds


def init(optimizer: Optimizer, params: Tree) -> dict:
    """A new state for ``params``: zero slots, and the optimizer's current step and
    scalars (so a new optimizer starts at step 0). Declares the kinds of flax's modules
    (:func:`declare_kinds`) first."""
    declare_kinds(optimizer, params)
    flat, _, _ = _flat(params)
    with _borrowed(optimizer, _scalars_only(optimizer)):
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
    with _borrowed(optimizer, state):
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
