"""Muon's options beyond MLX: decoupled weight decay, the Newton-Schulz eps, the learning-rate
adjustment, and the recipe of muon_adamw; checked against a float64 NumPy Muon written here
and against torch.optim.Muon."""

import numpy as np
import pytest

import treeopt as optim

A, B, C = 3.4445, -4.7750, 2.0315


def orthogonalise(d, steps=5, eps=1e-7):
    """The quintic Newton-Schulz iteration, in float64, on the wide orientation."""
    x = d.T if d.shape[0] > d.shape[1] else d
    x = x / (np.linalg.norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return x.T if d.shape[0] > d.shape[1] else x


def reference(
    weight,
    grads,
    lr,
    *,
    momentum=0.95,
    weight_decay=0.0,
    decoupled=False,
    nesterov=True,
    eps=1e-7,
    adjust="original",
    layout="out_in",
):
    """Muon on one weight, step by step, in float64. Its matrix: (out, in * rest) when the
    output axis is first, (rest * in, out) when it is last."""
    w, v = weight.astype(np.float64), np.zeros(weight.shape)
    if layout == "out_in":
        rows, cols = weight.shape[0], int(np.prod(weight.shape[1:]))
        original = np.sqrt(max(1.0, weight.shape[-2] / weight.shape[-1]))  # MLX's: the last two axes
    else:
        rows, cols = int(np.prod(weight.shape[:-1])), weight.shape[-1]
        original = np.sqrt(max(1.0, cols / rows))  # optax's: fan_out / fan_in
    scale = original if adjust == "original" else 0.2 * np.sqrt(max(rows, cols))
    for g in grads:
        g = g.astype(np.float64)
        if weight_decay and not decoupled:
            g = g + weight_decay * w
        v = momentum * v + (1 - momentum) * g
        d = (1 - momentum) * g + momentum * v if nesterov else v
        o = orthogonalise(d.reshape(rows, cols), eps=eps).reshape(weight.shape)
        if decoupled:
            w = w * (1 - lr * weight_decay)
        w = w - lr * scale * o
    return w


def problem(shape, steps=4, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape).astype(np.float32)
    return weight, [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]


def run(opt, weight, grads):
    params = {"w": weight.copy()}
    for g in grads:
        opt.update(params, {"w": g})
    return params["w"]


CASES = [
    dict(weight_decay=0.1, decoupled=True),
    dict(weight_decay=0.1, decoupled=True, adjust="match_rms_adamw"),
    dict(weight_decay=0.1, decoupled=False, adjust="match_rms_adamw"),
    dict(weight_decay=0.0, decoupled=False, eps=0.5, nesterov=False),
]


@pytest.mark.parametrize("shape", [(6, 3), (3, 6), (4, 2, 3)], ids=["tall", "wide", "3d"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_options_match_the_float64_reference(case, shape):
    weight, grads = problem(shape)
    opt = optim.Muon(
        0.05,
        weight_decay=case["weight_decay"],
        nesterov=case.get("nesterov", True),
        decoupled_weight_decay=case["decoupled"],
        ns_eps=case.get("eps", 1e-7),
        adjust_lr=case.get("adjust", "original"),
    )
    expected = reference(weight, grads, 0.05, **case)
    np.testing.assert_allclose(run(opt, weight, grads), expected, rtol=2e-5, atol=2e-5)


def test_decoupled_decay_differs_from_coupled_and_shrinks_by_lr_times_decay():
    weight, grads = problem((5, 4))
    coupled = run(optim.Muon(0.05, weight_decay=0.5), weight, grads[:1])
    decoupled = run(optim.Muon(0.05, weight_decay=0.5, decoupled_weight_decay=True), weight, grads[:1])
    undecayed = run(optim.Muon(0.05, weight_decay=0.0), weight, grads[:1])
    # one decoupled step = the undecayed step, less lr * wd * w
    np.testing.assert_allclose(decoupled, undecayed - 0.05 * 0.5 * weight, rtol=1e-5, atol=1e-6)
    assert not np.allclose(coupled, decoupled, atol=1e-3)


def test_match_rms_gives_the_update_adamw_rms():
    weight, grads = problem((64, 16), steps=1)
    new = run(optim.Muon(1.0, weight_decay=0.0, momentum=0.0, adjust_lr="match_rms_adamw"), weight, grads)
    rms = np.sqrt(np.mean((new - weight) ** 2))
    assert 0.15 < rms < 0.25  # Newton-Schulz leaves singular values near, not at, 1


def test_vectors_get_decoupled_decay_without_scaling():
    opt = optim.Muon(0.1, momentum=0.0, weight_decay=0.5, decoupled_weight_decay=True, adjust_lr="match_rms_adamw")
    params = {"b": np.ones(3, np.float32)}
    opt.update(params, {"b": np.full(3, 2.0, np.float32)})
    np.testing.assert_allclose(params["b"], 1.0 * (1 - 0.1 * 0.5) - 0.1 * 2.0, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(adjust_lr="spectral"), "Muon adjust_lr should be one of"),
        (dict(ns_eps=0.0), "Muon ns_eps should be a number >0"),
        (dict(ns_eps="small"), "Muon ns_eps should be a number >0"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.Muon(0.02, **kwargs)


def test_new_options_are_keyword_only_and_default_to_mlx():
    with pytest.raises(TypeError):
        optim.Muon(0.02, 0.95, 0.01, True, 5, True)
    opt = optim.Muon(0.02)
    assert (opt.decoupled_weight_decay, opt.ns_eps, opt.adjust_lr) == (False, 1e-7, "original")


def relative_gap(ours, theirs, start):
    """How far apart two runs end, relative to how far they moved."""
    return np.linalg.norm(ours - theirs) / np.linalg.norm(theirs - start)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", [(8, 5), (5, 8)])
def test_decoupled_muon_matches_torch_optim_muon(adjust, shape):
    torch = pytest.importorskip("torch", reason="torch.optim.Muon is the client checked against")
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    weight, grads = problem(shape, steps=5, seed=3)
    theirs = torch.nn.Parameter(torch.tensor(weight))
    reference_opt = torch.optim.Muon([theirs], lr=0.05, weight_decay=1.0, momentum=0.95, adjust_lr_fn=adjust)
    for g in grads:
        theirs.grad = torch.tensor(g)
        reference_opt.step()
    theirs = theirs.detach().numpy()

    def ours(**options):
        return run(optim.Muon(0.05, weight_decay=1.0, **options), weight, grads)

    # torch iterates Newton-Schulz in bfloat16 (we in float32): measured gaps are 0.1-0.4%;
    # the coupled decay or the other lr adjustment lands 8-87% away
    assert relative_gap(ours(decoupled_weight_decay=True, adjust_lr=adjust), theirs, weight) < 0.02
    assert relative_gap(ours(adjust_lr=adjust), theirs, weight) > 0.5
    other = "original" if adjust == "match_rms_adamw" else "match_rms_adamw"
    assert relative_gap(ours(decoupled_weight_decay=True, adjust_lr=other), theirs, weight) > 0.05


def test_muon_adamw_uses_keller_jordans_recipe():
    params = {
        "embed": np.ones((10, 4), np.float32),
        "blocks": [{"w": np.ones((4, 4), np.float32), "b": np.zeros(4, np.float32)}],
    }
    muon = optim.muon_adamw(params).optimizers[0]
    assert (muon.decoupled_weight_decay, muon.ns_eps, muon.adjust_lr) == (True, 1e-7, "original")
    assert muon.weight_decay == 0.01 and float(muon.learning_rate) == pytest.approx(0.02)
    rms = optim.muon_adamw(params, adjust_lr="match_rms_adamw", adamw_lr=1e-3).optimizers[0]
    assert rms.adjust_lr == "match_rms_adamw" and float(rms.learning_rate) == pytest.approx(1e-3)
    explicit = optim.muon_adamw(params, adjust_lr="match_rms_adamw", muon_lr=5e-3).optimizers[0]
    assert float(explicit.learning_rate) == pytest.approx(5e-3)


def test_muon_adamw_step_on_a_hidden_matrix_is_the_decoupled_reference():
    weight, grads = problem((6, 4), steps=3, seed=5)
    params = {"blocks": [{"w": weight.copy(), "b": np.zeros(6, np.float32)}]}
    opt = optim.muon_adamw(params)
    for g in grads:
        opt.update(params, {"blocks": [{"w": g, "b": np.ones(6, np.float32)}]})
    expected = reference(weight, grads, 0.02, weight_decay=0.01, decoupled=True)
    np.testing.assert_allclose(params["blocks"][0]["w"], expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((6, 3), "in_out"),
        ((3, 6), "in_out"),
        ((3, 3, 2, 4), "in_out"),  # a flax conv kernel (kh, kw, in, out): (18, 4)
        ((4, 2, 3, 3), "out_in"),  # a torch conv kernel (out, in, kh, kw): (4, 18)
        ((2, 3, 2, 16), "in_out"),  # fan_out 16 > fan_in 12: the "original" scale is sqrt(16 / 12)
    ],
)
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_layouts_match_the_float64_reference(shape, layout, adjust):
    weight, grads = problem(shape, seed=7)
    opt = optim.Muon(0.05, weight_decay=0.1, decoupled_weight_decay=True, adjust_lr=adjust, layout=layout)
    expected = reference(weight, grads, 0.05, weight_decay=0.1, decoupled=True, adjust=adjust, layout=layout)
    np.testing.assert_allclose(run(opt, weight, grads), expected, rtol=2e-5, atol=2e-5)


def test_in_out_is_out_in_on_the_transpose():
    weight, grads = problem((7, 3), seed=2)  # (in, out): Muon scales by sqrt(max(1, 3 / 7)) = 1
    flax_like = run(optim.Muon(0.05, layout="in_out"), weight, grads)
    torch_like = run(optim.Muon(0.05, layout="out_in"), weight.T.copy(), [g.T.copy() for g in grads])
    np.testing.assert_allclose(flax_like, torch_like.T, rtol=1e-6, atol=1e-6)
    as_mlx = run(optim.Muon(0.05), weight, grads)  # (7, 3) read as (out, in): scaled by sqrt(7 / 3)
    assert not np.allclose(as_mlx, flax_like, atol=1e-3)


def test_default_layout_changes_what_none_means_in_its_block_only():
    weight, grads = problem((7, 3), seed=2)
    with optim.optimizers.default_layout("in_out"):
        inside = run(optim.Muon(0.05), weight, grads)
        explicit = run(optim.Muon(0.05, layout="out_in"), weight, grads)  # an explicit layout wins
    np.testing.assert_array_equal(inside, run(optim.Muon(0.05, layout="in_out"), weight, grads))
    np.testing.assert_array_equal(explicit, run(optim.Muon(0.05, layout="out_in"), weight, grads))
    np.testing.assert_array_equal(run(optim.Muon(0.05), weight, grads), explicit)  # back to MLX's after it
    with pytest.raises(ValueError, match="default_layout: layout should be one of"):
        with optim.optimizers.default_layout("(in, out)"):
            pass


def test_layout_none_is_mlx_and_a_bad_layout_is_refused():
    weight, grads = problem((4, 2, 3), seed=4)
    np.testing.assert_array_equal(
        run(optim.Muon(0.05), weight, grads), run(optim.Muon(0.05, layout="out_in"), weight, grads)
    )
    with pytest.raises(ValueError, match="Muon layout should be None or one of"):
        optim.Muon(0.02, layout="(in, out)")


def test_muon_adamw_muon_weight_decay_is_muons_own():
    weight, grads = problem((6, 4), steps=3, seed=5)

    def train(**options):
        params = {"blocks": [{"w": weight.copy(), "b": np.zeros(6, np.float32)}], "head": {"weight": weight.copy()}}
        opt = optim.muon_adamw(params, **options)
        for g in grads:
            opt.update(params, {"blocks": [{"w": g, "b": np.ones(6, np.float32)}], "head": {"weight": g}})
        return opt, params

    opt, params = train(weight_decay=0.1, muon_weight_decay=0.0)
    assert [o.weight_decay for o in opt.optimizers] == [0.0, 0.0, 0.1]  # muon, adamw_no_decay, adamw
    expected = reference(weight, grads, 0.02, weight_decay=0.0, decoupled=True)
    np.testing.assert_allclose(params["blocks"][0]["w"], expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(params["head"]["weight"], train(weight_decay=0.1)[1]["head"]["weight"])
    assert train(weight_decay=0.1)[0].optimizers[0].weight_decay == 0.1  # default: weight_decay


def test_muon_adamw_reads_the_layout_from_the_names():
    def tree(name):
        return {"block": {name: np.ones((4, 6), np.float32), "bias": np.zeros(6, np.float32)}}

    assert optim.muon_adamw(tree("kernel")).optimizers[0].layout == "in_out"  # flax, Keras
    assert optim.muon_adamw(tree("weight")).optimizers[0].layout == "out_in"  # torch, MLX, equinox
    assert optim.muon_adamw(tree("w")).optimizers[0].layout is None
    assert optim.muon_adamw().optimizers[0].layout is None
    assert optim.muon_adamw(tree("kernel"), layout="out_in").optimizers[0].layout == "out_in"


def test_a_zero_size_matrix_takes_its_step_without_newton_schulz():
    weight = np.zeros((0, 4), np.float32)
    params = {"w": weight, "v": np.ones((3, 3), np.float32)}
    opt = optim.Muon(0.02)
    opt.update(params, {"w": np.zeros((0, 4), np.float32), "v": np.ones((3, 3), np.float32)})
    assert params["w"].shape == (0, 4) and int(opt.step) == 1
    assert opt.state["w"]["v"].shape == (0, 4)
