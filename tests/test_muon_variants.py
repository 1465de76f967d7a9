"""Muon's variants, each against its reference written here in float64 NumPy from the paper
and the code that runs it (never from treeopt): Polar Express (its coefficient table derived
from the paper's construction; dion's and modded-nanogpt's step), NorMuon (its authors'
reference and dion's), cautious weight decay (dion), MuonEq row equilibration and Muon+
renormalisation (nanochat's fused step, the whole recipe), per-head and per-block
Newton-Schulz (dion's ``num_heads`` and ``split_sizes``: each block updated as a parameter of
its own) and expert batch axes; on NumPy, torch, JAX and MLX arrays, 10 steps in float32."""

import numpy as np
import pytest

import treeopt as optim
from arrays import as_float64, available, backend_params, make
from muon_references import (
    KELLER,
    NS_TABLES_REFERENCE,
    STEP_GAP,
    assert_matches,
    gap,
    keller,
    nanochat,
    orthogonalise,
)
from treeopt.presets import RECIPES
from treeopt.rules.muon import NS_TABLES


# ---------------------------------------------------------------- Polar Express's table
def equioscillating_quintic(lo, hi):
    """The odd quintic p(x) = a x + b x^3 + c x^5 closest to 1 on [lo, hi] in the max norm
    (Remez exchange: the error alternates at lo, two interior extrema and hi)."""
    if lo / hi >= 1 - 5e-6:  # a point: the limit, p(x) = (15 x - 10 x^3 + 3 x^5) / 8 scaled to hi
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    q, r, error = (3 * lo + hi) / 4, (lo + 3 * hi) / 4, None
    for _ in range(100):
        system = np.array([[x, x**3, x**5, (-1) ** i] for i, x in enumerate([lo, q, r, hi])])
        a, b, c, e = np.linalg.solve(system, np.ones(4))
        root = np.sqrt(9 * b * b - 20 * a * c)  # p'(x) = 0 is a quadratic in x^2
        q, r = np.sqrt((-3 * b - root) / (10 * c)), np.sqrt((-3 * b + root) / (10 * c))
        if error is not None and abs(error - e) < 1e-15:
            break
        error = e
    return a, b, c


def polar_express_table(lower, steps, safety, cushion):
    """The composition of Amsel et al. (arXiv 2505.16932, Algorithm 1): each step the best
    quintic on the current interval of singular values (at least ``cushion`` of its top,
    then recentred), divided by the safety factor except the last."""
    lo, hi, table = lower, 1.0, []
    for k in range(steps):
        a, b, c = equioscillating_quintic(max(lo, cushion * hi), hi)
        if cushion * hi > lo:
            p_lo, p_hi = (a * x + b * x**3 + c * x**5 for x in (lo, hi))
            a, b, c = (2 / (p_lo + p_hi)) * np.array([a, b, c])
        if k < steps - 1:
            a, b, c = a / safety, b / safety**3, c / safety**5
        table.append((a, b, c))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    return table


def test_the_polar_express_table_is_the_papers_construction():
    # the setting nanochat, modded-nanogpt and dion name: 5 steps, safety 2e-2, cushion 0.02,
    # smallest singular value 1e-3
    derived = np.array(polar_express_table(1e-3, 5, 1.02, 0.02))
    np.testing.assert_allclose(np.array(NS_TABLES["polar_express"]), derived, rtol=1e-13)
    assert NS_TABLES["keller2024"] == tuple(KELLER)


# ---------------------------------------------------------------- float64 references
def normuon_authors(weight, grads, lr, momentum=0.95, beta2=0.95, weight_decay=0.0):
    """NorMuon's reference (github.com/zichongli5/NorMuon, ``normuon_update``): Keller
    Jordan's Muon, then each output row divided by the root of its running mean square (eps
    1e-10) and the matrix scaled back to its norm; decoupled decay."""
    w, m, s = weight.astype(np.float64), np.zeros(weight.shape), np.zeros((weight.shape[0], 1))
    for g in grads:
        m = momentum * m + (1 - momentum) * g
        u = orthogonalise((1 - momentum) * g + momentum * m)
        norm = np.linalg.norm(u)
        s = beta2 * s + (1 - beta2) * np.mean(u * u, axis=-1, keepdims=True)
        u = u / (np.sqrt(s) + 1e-10)
        u = u * norm / (np.linalg.norm(u) + 1e-10)
        u = u * max(1, w.shape[0] / w.shape[1]) ** 0.5
        w = w * (1 - lr * weight_decay) - lr * u
    return w


def dion_normuon(weight, grads, lr, mu=0.95, beta2=0.95, weight_decay=0.0, cautious=False, normuon=True):
    """dion's ``NorMuon`` (and ``Muon`` with ``normuon=False``), nesterov, Polar Express
    (safety 1.02, eps 1e-8), adjust_lr ``spectral_norm``: momentum M <- mu M + G, Newton-Schulz
    on G + mu M, NorMuon per output row (eps 1e-8), decay by lr * wd (cautious: where the
    update and the weight agree in sign), then the step by lr * sqrt(out / in)."""
    w, m, s = weight.astype(np.float64), np.zeros(weight.shape), np.zeros((weight.shape[0], 1))
    pe = NS_TABLES_REFERENCE["polar_express"]
    for g in grads:
        m = mu * m + g
        u = orthogonalise(g + mu * m, pe, safety=1.02, eps=1e-8)
        if normuon:
            norm = np.linalg.norm(u)
            s = s + (1 - beta2) * (np.mean(u * u, axis=-1, keepdims=True) - s)
            u = u / (np.sqrt(s) + 1e-8)
            u = u * norm / max(np.linalg.norm(u), 1e-8)
        mask = (w * u >= 0) if cautious else np.ones(w.shape)
        w = w - lr * weight_decay * w * mask
        w = w - lr * np.sqrt(w.shape[0] / w.shape[1]) * u
    return w


# ---------------------------------------------------------------- running treeopt
def problem(shape, steps=10, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal(shape) * scale).astype(np.float32)
    return weight, [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]


def run(opt, weight, grads, backend="numpy"):
    params = {"w": make(weight, backend)}
    for g in grads:
        opt.update(params, {"w": make(g, backend)})
    return as_float64(params["w"])


SHAPES = [(24, 16), (16, 24), (16, 16)]  # tall, wide, square


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_polar_express_is_dions_muon(shape, backend):
    weight, grads = problem(shape)
    theirs = dion_normuon(weight, grads, 0.02, weight_decay=0.1, normuon=False)
    ours = optim.Muon(0.02, weight_decay=0.1, decoupled_weight_decay=True, ns_coefficients="polar_express", ns_eps=1e-8)
    scale = np.sqrt(shape[0] / shape[1]) / max(1, shape[0] / shape[1]) ** 0.5  # dion scales wide matrices down
    if scale != 1:
        pytest.skip("dion's spectral-norm scale shrinks wide matrices: checked by the tall and square ones")
    assert_matches(run(ours, weight, grads, backend), theirs, weight)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_normuon_is_its_authors_reference(shape, backend):
    weight, grads = problem(shape, seed=1)
    theirs = normuon_authors(weight, grads, 0.02, weight_decay=0.1)
    ours = optim.Muon(0.02, weight_decay=0.1, decoupled_weight_decay=True, normuon=True)
    assert_matches(run(ours, weight, grads, backend), theirs, weight)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", [(24, 16), (16, 16)], ids=str)
def test_normuon_polar_express_and_cautious_decay_are_dions(shape, backend):
    weight, grads = problem(shape, seed=2, scale=0.05)  # small weights: the decay flips signs often
    theirs = dion_normuon(weight, grads, 0.02, weight_decay=2.0, cautious=True)
    ours = optim.Muon(
        0.02,
        weight_decay=2.0,
        decoupled_weight_decay=True,
        cautious_weight_decay=True,
        normuon="output",
        ns_coefficients="polar_express",
        ns_eps=1e-8,
    )
    assert_matches(run(ours, weight, grads, backend), theirs, weight)
    uncautious = optim.Muon(
        0.02, weight_decay=2.0, decoupled_weight_decay=True, normuon="output", ns_coefficients="polar_express"
    )
    assert gap(run(uncautious, weight, grads, backend), theirs, weight) > 100 * STEP_GAP  # the mask matters here


# the recipe under test: muon_adamw's "nanochat" Muon (its numbers come from nanochat(...) above)
NANOCHAT = {**RECIPES["nanochat"], "decoupled_weight_decay": True}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "shape, weight_decay",
    [((16, 24), 0.5), ((16, 16), 0.5), ((24, 16), 0.0)],  # tall: see the test below
    ids=str,
)
def test_the_nanochat_recipe_is_nanochats_step(shape, weight_decay, backend):
    weight, grads = problem(shape, seed=3, scale=0.05)
    theirs = nanochat(weight, grads, 0.02, weight_decay=weight_decay)
    ours = optim.Muon(0.02, weight_decay=weight_decay, **NANOCHAT)
    assert_matches(run(ours, weight, grads, backend), theirs, weight)
    preset = optim.muon_adamw(muon_weight_decay=weight_decay, variant="nanochat", layout="out_in")
    params = {"blocks": {"w": make(weight, backend), "b": make(np.zeros(shape[0]), backend)}}
    for g in grads:
        preset.update(params, {"blocks": {"w": make(g, backend), "b": make(np.ones(shape[0]), backend)}})
    assert preset.names[preset.route("blocks.w")] == "muon"
    assert_matches(as_float64(params["blocks"]["w"]), theirs, weight)


def test_nanochat_decays_tall_matrices_by_the_scaled_rate_and_treeopt_by_the_base_rate():
    weight, grads = problem((24, 16), seed=3, scale=0.05)
    ours = run(optim.Muon(0.02, weight_decay=0.5, **NANOCHAT), weight, grads)
    # nanochat's decay of a 24 x 16 matrix is sqrt(1.5) times treeopt's: the same step with the
    # decay divided by that factor is nanochat's
    theirs = nanochat(weight, grads, 0.02, weight_decay=0.5 / np.sqrt(1.5))
    assert_matches(ours, theirs, weight)
    assert gap(ours, nanochat(weight, grads, 0.02, weight_decay=0.5), weight) > 100 * STEP_GAP


def test_each_option_changes_the_step():
    weight, grads = problem((16, 24), steps=3, seed=4, scale=0.05)
    base = dict(weight_decay=0.5, decoupled_weight_decay=True)
    plain = run(optim.Muon(0.02, **base), weight, grads)
    for option in (
        dict(ns_coefficients="polar_express"),
        dict(ns_safety=1.05),
        dict(row_equilibration=True),
        dict(renormalization=True),
        dict(normuon=True),
        dict(normuon="larger"),
        dict(cautious_weight_decay=True),
    ):
        assert gap(run(optim.Muon(0.02, **base, **option), weight, grads), plain, weight) > 1e-3, option
    # on a tall matrix the longer side is the rows: "larger" is "output"
    tall, tall_grads = problem((24, 16), steps=3, seed=4)
    np.testing.assert_array_equal(
        run(optim.Muon(0.02, normuon="larger"), tall, tall_grads), run(optim.Muon(0.02, normuon=True), tall, tall_grads)
    )


@pytest.mark.parametrize("backend", backend_params())
def test_split_sizes_update_each_block_as_a_parameter_of_its_own(backend):
    # a fused QKV projection under grouped-query attention: q 8 rows, k and v 4 each
    weight, grads = problem((16, 6), seed=5)
    blocks = [(0, 8), (8, 12), (12, 16)]
    theirs = np.concatenate([keller(weight[a:b], [g[a:b] for g in grads], 0.02, weight_decay=0.1) for a, b in blocks])
    ours = optim.Muon(0.02, weight_decay=0.1, decoupled_weight_decay=True, split_sizes=(8, 4, 4))
    assert_matches(run(ours, weight, grads, backend), theirs, weight)
    whole = keller(weight, grads, 0.02, weight_decay=0.1)
    assert gap(whole, theirs, weight) > 0.1  # orthogonalising the fused matrix is another step


@pytest.mark.parametrize("backend", backend_params())
def test_num_heads_with_normuon_update_each_head_as_dion(backend):
    weight, grads = problem((12, 8), seed=6)  # 3 heads of 4 rows
    theirs = np.concatenate(
        [normuon_authors(weight[h : h + 4], [g[h : h + 4] for g in grads], 0.02) for h in (0, 4, 8)]
    )
    ours = optim.Muon(0.02, weight_decay=0.0, normuon=True, num_heads=3)
    assert_matches(run(ours, weight, grads, backend), theirs, weight)
    fresh = optim.Muon(0.02, normuon=True, num_heads=3)
    fresh.init({"w": weight.copy()})
    assert fresh.state["w"]["second_moment"].shape == (12,)  # one value per output neuron


@pytest.mark.parametrize("backend", backend_params())
def test_batch_axes_orthogonalise_each_expert(backend):
    weight, grads = problem((3, 8, 6), seed=7)  # 3 experts (out 8, in 6)
    theirs = np.stack([normuon_authors(weight[e], [g[e] for g in grads], 0.02, weight_decay=0.1) for e in range(3)])
    ours = optim.Muon(0.02, weight_decay=0.1, decoupled_weight_decay=True, normuon=True, batch_axes=1)
    assert_matches(run(ours, weight, grads, backend), theirs, weight)
    flat = run(optim.Muon(0.02, weight_decay=0.1, decoupled_weight_decay=True, normuon=True), weight, grads)
    assert gap(flat, theirs, weight) > 0.1  # without: one (8, 18) matrix, as MLX and Keller Jordan


def test_in_out_layout_reads_the_outputs_as_columns():
    weight, grads = problem((16, 24), seed=8, scale=0.05)  # (out, in) for torch
    options = dict(NANOCHAT, weight_decay=0.5)
    torch_like = run(optim.Muon(0.02, **options, layout="out_in"), weight, grads)
    flax_like = run(optim.Muon(0.02, **options, layout="in_out"), weight.T.copy(), [g.T.copy() for g in grads])
    np.testing.assert_allclose(flax_like.T, torch_like, rtol=1e-5, atol=1e-6)
    for blocks in (dict(num_heads=4), dict(split_sizes=(8, 4, 4))):  # blocks of the outputs: columns in flax
        options = dict(NANOCHAT, weight_decay=0.5, normuon="output", **blocks)
        torch_like = run(optim.Muon(0.02, **options, layout="out_in"), weight, grads)
        flax_like = run(optim.Muon(0.02, **options, layout="in_out"), weight.T.copy(), [g.T.copy() for g in grads])
        np.testing.assert_allclose(flax_like.T, torch_like, rtol=1e-5, atol=1e-6, err_msg=str(blocks))


def test_polar_express_past_its_table_repeats_the_last_triple():
    weight, grads = problem((16, 24), steps=2, seed=9)
    table = NS_TABLES_REFERENCE["polar_express"]

    def reference(steps):
        w, m = weight.astype(np.float64), np.zeros(weight.shape)
        for g in grads:
            m = 0.95 * m + 0.05 * g
            w = w - 0.02 * orthogonalise(0.05 * g + 0.95 * m, table, steps=steps, safety=1.02)
        return w

    for steps in (3, 7):
        ours = run(optim.Muon(0.02, weight_decay=0.0, ns_steps=steps, ns_coefficients="polar_express"), weight, grads)
        assert_matches(ours, reference(steps), weight)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ns_coefficients="polar"), "Muon ns_coefficients should be one of"),
        (dict(ns_safety=0.9), "Muon ns_safety should be None or a number >= 1"),
        (dict(normuon="rows"), "Muon normuon should be True, False, None or one of"),
        (dict(normuon_beta2=1.0), "Muon normuon_beta2 should be in"),
        (dict(cautious_weight_decay=True), "needs decoupled_weight_decay=True"),
        (dict(batch_axes=-1), "Muon batch_axes should be an integer"),
        (dict(num_heads=0), "Muon num_heads should be None or an integer"),
        (dict(split_sizes=(4,)), "Muon split_sizes should be None or two or more"),
        (dict(split_sizes=(4, 0)), "Muon split_sizes should be None or two or more"),
        (dict(split_sizes=(4, 4), num_heads=2), "not both"),
        (dict(normuon="larger", num_heads=2), "normuon='larger' picks rows or columns"),
    ],
)
def test_options_that_do_not_fit_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.Muon(0.02, **kwargs)


def test_blocks_that_do_not_fit_the_weight_are_refused_before_any_change():
    opt = optim.Muon(0.02, split_sizes=(4, 4), normuon=True)
    params = {"w": np.ones((6, 3), np.float32)}
    with pytest.raises(ValueError, match=r"split_sizes=\(4, 4\) do not sum to the 6 outputs"):
        opt.update(params, {"w": np.ones((6, 3), np.float32)})
    np.testing.assert_array_equal(params["w"], 1.0)
    assert "w" not in opt.state


def test_muon_adamw_variant_names_its_recipe_and_refuses_unknown_ones(capsys):
    params = {
        "blocks": {"w": np.ones((8, 8), np.float32), "b": np.zeros(8, np.float32)},
        "embed": np.ones((10, 8), np.float32),
    }
    muon = optim.muon_adamw(params, variant="nanochat", print_plan=True).optimizers[0]
    assert "Muon's recipe 'nanochat'" in capsys.readouterr().out
    assert (muon.ns_coefficients, muon.normuon, muon.cautious_weight_decay) == ("polar_express", "larger", True)
    default = optim.muon_adamw(params).optimizers[0]
    assert (default.ns_coefficients, default.normuon, default.row_equilibration) == ("keller2024", None, False)
    with pytest.raises(ValueError, match="muon_adamw variant should be one of"):
        optim.muon_adamw(params, variant="modded")


# ---------------------------------------------------------------- runners, compilers, checkpoints
def every_variant(**extra):
    return optim.Muon(0.02, weight_decay=0.5, **{**NANOCHAT, "normuon": "output", **extra})


def tree(seed):
    rng = np.random.default_rng(seed)
    shapes = {"a": (16, 8), "b": (16, 8), "c": (8, 16), "experts": (2, 8, 4), "bias": (8,)}
    return {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}


def test_jax_jit_runs_the_variants_as_numpy_does():
    jax = pytest.importorskip("jax", reason="the jitted step is JAX's")
    import treeopt.jax as tjax

    params, grads = tree(0), [tree(s) for s in (1, 2, 3)]
    expected = {k: v.copy() for k, v in params.items()}
    numpy_opt = every_variant(layout="out_in")
    for g in grads:
        numpy_opt.update(expected, g)
    opt = every_variant(layout="out_in")
    state = tjax.init(opt, {k: jax.numpy.asarray(v) for k, v in params.items()})
    step = jax.jit(lambda g, s, p: tjax.update(opt, g, s, p))
    current = {k: jax.numpy.asarray(v) for k, v in params.items()}
    for g in grads:
        current, state = step({k: jax.numpy.asarray(v) for k, v in g.items()}, state, current)
    for k in params:
        np.testing.assert_allclose(np.asarray(current[k]), expected[k], rtol=2e-5, atol=2e-6, err_msg=k)
    assert state["c"]["second_moment"].shape == (8,)


def test_mlx_compile_runs_the_variants_as_numpy_does():
    mx = pytest.importorskip("mlx.core", reason="mx.compile is MLX's")
    from functools import partial

    params, grads = tree(0), [tree(s) for s in (1, 2, 3)]
    expected = {k: v.copy() for k, v in params.items()}
    numpy_opt = every_variant()
    for g in grads:
        numpy_opt.update(expected, g)
    opt = every_variant()
    current = {k: mx.array(v) for k, v in params.items()}
    opt.init(current)

    @partial(mx.compile, inputs=opt.state, outputs=opt.state)
    def step(p, g):
        return opt.apply_gradients(g, p)

    for g in grads:
        current = step(current, {k: mx.array(v) for k, v in g.items()})
        mx.eval(current)
    for k in params:
        np.testing.assert_allclose(np.array(current[k]), expected[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_normuons_moments_are_checkpointed_by_name_and_resume_exactly(tmp_path):

    params, grads = tree(0), [tree(s) for s in (1, 2, 3, 4)]

    def loaded(saved, resumed):
        np.testing.assert_array_equal(resumed.state["a"]["second_moment"], saved.state["a"]["second_moment"])

    assert_resumes_exactly(every_variant, params, grads, tmp_path / "opt.safetensors", loaded)


def assert_resumes_exactly(make, params, grads, path, loaded=None):
    """A run of ``make()`` saved to ``path`` after half the steps and resumed by a fresh
    ``make()`` ends bit-identical to an uninterrupted run; ``loaded(saved, resumed)`` checks
    the two optimizers right after the load. Returns the resumed optimizer."""
    from treeopt import checkpoint

    straight = {k: v.copy() for k, v in params.items()}
    opt = make()
    for g in grads:
        opt.update(straight, g)
    resumed = {k: v.copy() for k, v in params.items()}
    first = make()
    for g in grads[: len(grads) // 2]:
        first.update(resumed, g)
    checkpoint.save(first, path)
    second = make()
    checkpoint.load(second, path, params=resumed)
    if loaded is not None:
        loaded(first, second)
    for g in grads[len(grads) // 2 :]:
        second.update(resumed, g)
    for k in params:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
    return second


def test_a_checkpoint_without_normuons_moments_does_not_load_into_normuon(tmp_path):
    from treeopt import checkpoint

    params = tree(0)
    plain = optim.Muon(0.02)
    plain.update(params, tree(1))
    checkpoint.save(plain, tmp_path / "opt.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="second_moment"):
        checkpoint.load(optim.Muon(0.02, normuon=True), tmp_path / "opt.safetensors", params=params)


# ---------------------------------------------------------------- a route's view of one parameter
# Options a route gives Muon for one parameter (the kinds of torch and MLX modules declare
# them: an expert stack's batch_axes, a Conv1D's layout) change what its slots are: NorMuon
# keeps one value per neuron of each matrix. The slots are made, checked, planned and
# checkpointed for the view the step computes with.
def expert_multi(**options):
    """NorMuon for the stack ``experts`` (3 experts, out 8, in 6) and the matrix ``w`` (out
    8, in 6), AdamW for the rest; ``experts`` declared one matrix per expert."""
    multi = optim.MultiOptimizer(
        [
            optim.Muon(0.02, weight_decay=0.1, decoupled_weight_decay=True, normuon=True, **options),
            optim.AdamW(1e-3),
        ],
        [lambda path, w: path in ("experts", "w")],
        names=["muon", "adamw"],
    )
    multi.router.declare_options({"experts": {"batch_axes": 1}})
    return multi


def expert_problem(steps=4):
    stack, stack_grads = problem((3, 8, 6), steps=steps, seed=12)
    matrix, matrix_grads = problem((8, 6), steps=steps, seed=13)
    params = {"experts": stack, "w": matrix, "b": np.zeros(8, np.float32)}
    grads = [{"experts": g, "w": h, "b": np.ones(8, np.float32)} for g, h in zip(stack_grads, matrix_grads)]
    return params, grads


@pytest.mark.parametrize("backend", backend_params())
def test_a_routes_batch_axes_give_each_expert_its_own_normuon_moments(backend):
    params, grads = expert_problem()
    theirs = np.stack(
        [
            normuon_authors(params["experts"][e], [g["experts"][e] for g in grads], 0.02, weight_decay=0.1)
            for e in range(3)
        ]
    )
    multi = expert_multi()
    ours = {k: make(v, backend) for k, v in params.items()}
    for g in grads:
        multi.update(ours, {k: make(v, backend) for k, v in g.items()})
    assert_matches(as_float64(ours["experts"]), theirs, params["experts"])
    assert_matches(
        as_float64(ours["w"]), normuon_authors(params["w"], [g["w"] for g in grads], 0.02, 0.95, 0.95, 0.1), params["w"]
    )
    assert tuple(multi.state["states"][0]["experts"]["second_moment"].shape) == (3, 8)  # one per output of each expert
    assert tuple(multi.state["states"][0]["w"]["second_moment"].shape) == (8,)


def test_a_routes_view_is_planned_checked_and_checkpointed(tmp_path):
    from treeopt import engine

    params, grads = expert_problem()
    routed = expert_multi()
    engine.route(routed.router, params, "MultiOptimizer")  # routes decided, no state yet
    predicted = {row.path: row.state_bytes for row in routed.plan().rows}
    assert predicted["experts"] == 4 * (3 * 8 * 6 + 3 * 8)  # momentum, and a second moment per expert output
    assert {row.path: row.state_bytes for row in routed.plan(params).rows} == predicted  # the slots made
    second = assert_resumes_exactly(expert_multi, params, grads, tmp_path / "opt.safetensors")
    # a state made for the stack read as one matrix (a second moment of 3 values) is refused
    state = second.state["states"][0]
    wrong = {**state, "experts": {**state["experts"], "second_moment": np.zeros(3, np.float32)}}
    with pytest.raises(
        ValueError, match=r"slot 'second_moment' of 'experts' is float32\[3\]; the parameter needs float32\[3, 8\]"
    ):
        second.optimizers[0].state = wrong


def test_options_declared_after_the_slots_were_made_remake_them_before_the_first_step():
    params, grads = expert_problem()
    multi = optim.MultiOptimizer(
        [optim.Muon(0.02, weight_decay=0.1, decoupled_weight_decay=True, normuon=True), optim.AdamW(1e-3)],
        [lambda path, w: path in ("experts", "w")],
    )
    multi.init(params)  # the stack read as one (3, 48) matrix: a second moment of 3 values
    assert multi.state["states"][0]["experts"]["second_moment"].shape == (3,)
    multi.router.declare_options({"experts": {"batch_axes": 1}})
    ours = {k: v.copy() for k, v in params.items()}
    for g in grads:
        multi.update(ours, g)
    assert multi.state["states"][0]["experts"]["second_moment"].shape == (3, 8)
    theirs = np.stack(
        [
            normuon_authors(params["experts"][e], [g["experts"][e] for g in grads], 0.02, weight_decay=0.1)
            for e in range(3)
        ]
    )
    assert_matches(ours["experts"], theirs, params["experts"])


@pytest.mark.parametrize("backend", backend_params())
def test_a_split_declared_for_one_parameter_updates_each_block_as_its_own(backend):
    weight, grads = problem((16, 6), seed=5)
    blocks = [(0, 8), (8, 12), (12, 16)]
    theirs = np.concatenate([keller(weight[a:b], [g[a:b] for g in grads], 0.02, weight_decay=0.1) for a, b in blocks])
    muon = optim.Muon(0.02, weight_decay=0.1, decoupled_weight_decay=True)
    muon.router.declare_options({"w": {"split_sizes": (8, 4, 4)}})
    assert_matches(run(muon, weight, grads, backend), theirs, weight)


def test_under_treeopt_jax_normuons_moments_follow_flax_kernels():
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    import treeopt.jax

    weight, grads = problem((16, 24), seed=14)  # (out, in); flax keeps the kernel (in, out)
    theirs = normuon_authors(weight, grads, 0.02, weight_decay=0.1)
    tx = treeopt.jax.as_optax(optim.Muon(0.02, weight_decay=0.1, decoupled_weight_decay=True, normuon="output"))
    params = {"dense": {"kernel": jnp.asarray(weight.T)}}
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"dense": {"kernel": jnp.asarray(g.T)}}, state, params)
        params = optax.apply_updates(params, updates)
    assert_matches(np.asarray(params["dense"]["kernel"], np.float64).T, theirs, weight)


RUNNERS = [("numpy", "never")] + [("torch", g) for g in ("never", "always") if available("torch")]


@pytest.mark.parametrize("backend, graphs", RUNNERS, ids=["numpy", "torch", "torch graph step"][: len(RUNNERS)])
def test_stacked_and_compiled_steps_equal_the_per_tensor_rule(backend, graphs, monkeypatch):
    import treeopt.kernels as kernels
    from treeopt.kernels import stacking

    def train(alone):
        if alone:
            monkeypatch.setattr(stacking, "chunks", lambda b, like, indices: [[k] for k in indices])
            monkeypatch.setattr(kernels, "enabled", False)
        else:  # "always": the CUDA graph runner's step (eager off CUDA)
            monkeypatch.setattr(kernels, "torch_graphs", graphs)
        params = {k: make(v, backend) for k, v in tree(0).items()}
        opt = every_variant(normuon="larger", cautious_weight_decay=True)
        for s in (1, 2, 3):  # from the second step, the compiled step and its stacking buffers
            opt.update(params, {k: make(v, backend) for k, v in tree(s).items()})
        monkeypatch.undo()
        return {k: as_float64(v) for k, v in params.items()}

    stacked, alone = train(False), train(True)
    for k in stacked:
        np.testing.assert_allclose(stacked[k], alone[k], rtol=2e-5, atol=2e-6, err_msg=k)
