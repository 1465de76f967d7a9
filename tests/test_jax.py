"""treeopt in JAX: pure init/update under jax.jit, the optax adapter, flax models."""

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX tests need jax")
import jax.numpy as jnp  # noqa: E402

import treeopt as optim  # noqa: E402
import treeopt.jax as tj  # noqa: E402


def params():
    return {
        "params": {
            "Dense_0": {"kernel": jnp.full((3, 4), 0.5, jnp.float32), "bias": jnp.zeros(4)},
            "head": {"kernel": jnp.full((4, 2), 0.3, jnp.float32)},
        }
    }


def loss(p, x):
    hidden = jnp.tanh(x @ p["params"]["Dense_0"]["kernel"] + p["params"]["Dense_0"]["bias"])
    return jnp.mean((hidden @ p["params"]["head"]["kernel"] - 1.0) ** 2)


def muon_adamw(**muon_options):
    return optim.MultiOptimizer(
        [optim.Muon(0.02, **muon_options), optim.AdamW(optim.cosine_decay(0.05, 20))],
        [lambda path, w: w.ndim == 2 and "Dense" in path],
    )


X = jnp.linspace(-1, 1, 12).reshape(4, 3)


def test_paths_are_dotted_key_paths():
    flat, names, _ = tj._flat(params())
    assert names == ["params.Dense_0.bias", "params.Dense_0.kernel", "params.head.kernel"]

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Linear:  # an equinox-style module: fields are GetAttrKey entries
        weight: jax.Array
        bias: jax.Array

    _, names, _ = tj._flat({"layers": [Linear(jnp.ones((2, 2)), jnp.zeros(2))]})
    assert names == ["layers.0.weight", "layers.0.bias"]


def test_update_is_pure_and_matches_the_stateful_optimizer():
    # the functions take weights as flax lays them out, (in, out); the stateful API as MLX does
    functional, stateful = muon_adamw(), muon_adamw(layout="in_out")
    state, p = tj.init(functional, params()), params()
    q = params()
    for _ in range(3):
        p, state = tj.update(functional, jax.grad(loss)(p, X), state, p)
        stateful.update(q, jax.grad(loss)(q, X))
    assert int(functional.step) == 0 and functional.route("params.head.kernel") == 1
    assert functional.optimizers[0].scalars.hyperparameters()["layout"] == "out_in"  # lent for the call only
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)):
        assert jnp.array_equal(a, b)
    assert int(state["states"][0]["step"]) == 3
    assert set(state["states"][0]) == {"step", "learning_rate", "params.Dense_0.kernel"}


def test_jit_traces_once_and_learning_rate_changes_need_no_retrace():
    opt = muon_adamw()
    traces = []

    @jax.jit
    def step(p, state):
        traces.append(1)
        return tj.update(opt, jax.grad(loss)(p, X), state, p)

    p, state = params(), tj.init(opt, params())
    losses = []
    for i in range(6):
        if i == 3:
            state["states"][0]["learning_rate"] = jnp.asarray(0.01, jnp.float32)
        p, state = step(p, state)
        losses.append(float(loss(p, X)))
    assert len(traces) == 1
    assert losses[-1] < losses[0]
    assert float(state["states"][0]["learning_rate"]) == pytest.approx(0.01)
    np.testing.assert_allclose(
        float(state["states"][1]["learning_rate"]), float(optim.cosine_decay(0.05, 20)(5)), rtol=1e-6
    )


def test_optax_adapter_composes_and_runs_under_jit():
    optax = pytest.importorskip("optax")
    opt = muon_adamw()
    tx = optax.chain(optax.clip_by_global_norm(1.0), tj.as_optax(opt))
    p, state = params(), tx.init(params())

    @jax.jit
    def step(p, state):
        grads = jax.grad(loss)(p, X)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    start = float(loss(p, X))
    for _ in range(10):
        p, state = step(p, state)
    assert float(loss(p, X)) < 0.5 * start
    with pytest.raises(ValueError, match="needs the parameters"):
        tj.as_optax(opt).update(jax.grad(loss)(p, X), tj.init(opt, p))


def test_optax_updates_give_the_direct_result_up_to_rounding():
    optax = pytest.importorskip("optax")
    tx = tj.as_optax(muon_adamw())
    direct = muon_adamw()
    p, q = params(), params()
    state, direct_state = tx.init(p), tj.init(direct, q)
    for _ in range(3):
        updates, state = tx.update(jax.grad(loss)(p, X), state, p)
        p = optax.apply_updates(p, updates)
        q, direct_state = tj.update(direct, jax.grad(loss)(q, X), direct_state, q)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_flax_nnx_optimizer_routes_by_attribute_path():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Linear(3, 8, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
            self.head = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.embed(x))
            for layer in self.layers:
                x = nnx.relu(layer(x))
            return self.head(x)

    model = MLP(nnx.Rngs(0))
    multi = optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(0.01)], [lambda path, w: path.startswith("layers.") and path.endswith("kernel")]
    )
    optimizer = nnx.Optimizer(model, tj.as_optax(multi), wrt=nnx.Param)

    def mse(model):
        return jnp.mean((model(X) - 1.0) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        value, grads = nnx.value_and_grad(mse)(model)
        optimizer.update(model, grads)
        return value

    losses = [float(train_step(model, optimizer)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    assert multi.route("layers.0.kernel") == 0 and multi.route("embed.kernel") == 1 and multi.route("head.bias") == 1


def test_flax_linen_train_state():
    linen = pytest.importorskip("flax.linen")
    train_state = pytest.importorskip("flax.training.train_state")

    class Net(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(1)(linen.relu(linen.Dense(8)(x)))

    net = Net()
    variables = net.init(jax.random.key(0), X)
    # linen numbers layers as they are built: Dense(1), the output layer, is Dense_0; Muon
    # takes the first layer, Dense(8) (Dense_1)
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.Adam(0.01)], [lambda path, w: path == "Dense_1.kernel"])
    state = train_state.TrainState.create(apply_fn=net.apply, params=variables["params"], tx=tj.as_optax(multi))

    @jax.jit
    def step(state):
        grads = jax.grad(lambda p: jnp.mean((state.apply_fn({"params": p}, X) - 1.0) ** 2))(state.params)
        return state.apply_gradients(grads=grads)

    first = float(jnp.mean((net.apply({"params": state.params}, X) - 1.0) ** 2))
    for _ in range(20):
        state = step(state)
    last = float(jnp.mean((net.apply({"params": state.params}, X) - 1.0) ** 2))
    assert last < 0.5 * first
    assert multi.route("Dense_1.kernel") == 0 and multi.route("Dense_0.kernel") == 1


def lm_parts(nnx):
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(16, 16, rngs=rngs)  # as wide as the vocabulary: not a head

    class TinyLM(nnx.Module):  # names that the name filters do not know
        def __init__(self, rngs):
            self.tok = nnx.Embed(16, 16, rngs=rngs)
            self.blocks = nnx.List([Block(rngs) for _ in range(2)])
            self.out = nnx.Linear(16, 16, rngs=rngs)

        def __call__(self, ids):
            x = self.tok(ids)
            for block in self.blocks:
                x = jnp.tanh(block.fc(x))
            return self.out(x)

    return TinyLM


def test_flax_nnx_embed_and_head_are_known_by_module():
    nnx = pytest.importorskip("flax.nnx")
    model = lm_parts(nnx)(nnx.Rngs(0))
    expected = {"tok.embedding": "embedding", "out.kernel": "head"}
    assert roles(tj.module_kinds(model)) == expected
    assert roles(tj.module_kinds(nnx.state(model, nnx.Param))) == expected  # the tree nnx.Optimizer hands optax

    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(0.01)], [lambda path, w: w.ndim == 2])
    with pytest.warns(optim.RoutingWarning) as warned:
        optimizer = nnx.Optimizer(model, tj.as_optax(multi), wrt=nnx.Param)
    messages = [str(w.message) for w in warned]
    assert any("'out.kernel'" in m and "output head" in m for m in messages)
    assert any("'tok.embedding'" in m and "embedding" in m for m in messages)
    ids = jnp.arange(8) % 16

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(ids) ** 2))(model))

    step(model, optimizer)
    hidden = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(0.01)], [optim.filters.is_hidden_matrix])
    tj.init(hidden, nnx.state(model, nnx.Param))
    assert [hidden.route(p) for p in ("blocks.0.fc.kernel", "tok.embedding", "out.kernel")] == [0, 1, 1]


def test_flax_linen_head_is_the_shallowest_last_dense_onto_the_vocabulary():
    linen = pytest.importorskip("flax.linen")

    class Block(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(16)(x)  # as wide as the vocabulary, but inside a block

    class TinyLM(linen.Module):
        @linen.compact
        def __call__(self, ids):
            x = linen.Embed(16, 16)(ids)
            for _ in range(11):
                x = Block()(x)
            x = linen.Dense(16)(x)
            return linen.Dense(16)(x)  # Dense_1: the head (the blocks' Dense_0 are deeper)

    params = TinyLM().init(jax.random.key(0), jnp.zeros(4, jnp.int32))["params"]
    assert roles(tj.module_kinds(params)) == {"Embed_0.embedding": "embedding", "Dense_1.kernel": "head"}
    opt = optim.muon_adamw(params)  # a tree of JAX arrays: flax's kinds are declared before routing
    assert opt.names[opt.route("Dense_1.kernel")] == "adamw"
    assert opt.names[opt.route("Dense_0.kernel")] == "muon" and opt.optimizers[0].layout == "in_out"
    assert opt.names[opt.route("Block_3.Dense_0.kernel")] == "muon"


def test_of_several_denses_onto_the_vocabulary_the_last_is_the_head():
    tree = {
        "Embed_0": {"embedding": jnp.zeros((8, 4))},
        "Dense_2": {"kernel": jnp.zeros((4, 8))},
        "Dense_10": {"kernel": jnp.zeros((8, 8))},
        "Dense_3": {"kernel": jnp.zeros((8, 5))},
    }
    assert roles(tj.module_kinds(tree)) == {"Embed_0.embedding": "embedding", "Dense_10.kernel": "head"}
    # no vocabulary, no head: a model of one layer reads its input (and is not a hidden matrix)
    assert tj.module_kinds({"Dense_0": {"kernel": jnp.zeros((4, 8))}}) == {"Dense_0.kernel": {"linear", "input"}}


def roles(kinds):
    """The embeddings and heads of ``module_kinds``' answer."""
    return {path: role for path, found in kinds.items() for role in ("embedding", "head") if role in found}
