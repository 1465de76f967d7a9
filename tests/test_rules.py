"""The rule contract (treeopt.rules.base), checked when a rule is defined: signatures, the
hyper-parameters derived from the coefficient function, only compilable ops in an elementwise
update, coefficient names checked before anything changes, a loop that cannot compile falls
back; and the optimizer-level running values that plans, checkpoints and every backend keep."""

import inspect

import numpy as np
import pytest

import treeopt as optim
import treeopt.kernels as kernels
from arrays import as_float64, backend_params, make
from registry import SETTINGS
from treeopt import checkpoint, ops, rules
from treeopt.ops import cos, maximum, mean, rsqrt, where
from treeopt.rules.base import Parts, Rule, RuleError
from treeopt.tree import tree_flatten


def plain_coefficients(lr, step, *, decay):
    return dict(lr=lr, decay=decay)


def plain(grad, param, v, lr, decay):
    v = decay * v + grad
    return param - lr * v, v


def test_a_rule_that_follows_the_contract_is_accepted_and_says_its_hyperparameters():
    rule = Rule("plain", plain, plain_coefficients, slots=("v",))
    assert rule.hyperparameters == ("decay",) and rule.coefficient_names() == ("lr", "decay")


@pytest.mark.parametrize(
    "case, message",
    [
        (dict(update=lambda param, grad, v, lr, decay: None), r"start with \(grad, param"),
        (dict(slots=("m",)), r"takes the slots \['v'\] but the rule declares \['m'\]"),
        (dict(slots=lambda shape, hyper: {"v": shape}), r"\*slots"),
        (dict(update=lambda grad, param, v, **coefficients: None), r"no \*\*kwargs"),
        (dict(coefficients=lambda lr, step, decay: {}), "keyword-only|coefficients must be"),
        (dict(coefficients=lambda rate, step, *, decay: {}), "coefficients must be"),
        (dict(running=("total",)), "running values"),
        (dict(copies_param=("z",)), "copies_param names"),
        (dict(parts=Parts(plain, plain, plain)), "parts split an update that needs whole tensors"),
    ],
)
def test_a_rule_that_breaks_the_contract_is_refused_when_defined(case, message):
    arguments = {**dict(name="broken", update=plain, coefficients=plain_coefficients, slots=("v",)), **case}
    with pytest.raises(RuleError, match=message):
        Rule(**arguments)


MUON_SETTINGS = [
    dict(nesterov=True),
    dict(nesterov=False, decoupled_weight_decay=True),
    # nanochat's recipe: Polar Express, MuonEq, Muon+, NorMuon (its moments go with the rows)
    dict(
        decoupled_weight_decay=True,
        cautious_weight_decay=True,
        ns_coefficients="polar_express",
        row_equilibration=True,
        renormalization=True,
        normuon="output",
    ),
    dict(num_heads=2, normuon="output"),
]


@pytest.mark.parametrize("settings", MUON_SETTINGS)
def test_muons_parts_in_a_row_are_its_update(settings):
    # FSDP2 runs the elementwise parts on each rank's rows and the whole part on one owner
    rng = np.random.default_rng(0)
    grad, param, v = (rng.standard_normal((6, 4), dtype=np.float32) for _ in range(3))
    muon = optim.Muon(0.02, weight_decay=0.1, **settings)
    hyper = muon.scalars.hyperparameters()
    values = rules.MUON.coefficients(np.float32(0.02), np.float32(3.0), **hyper)
    values = {k: np.float32(x) if isinstance(x, float) else x for k, x in values.items()}
    slots = {n: rng.random(shape, dtype=np.float32) for n, shape in rules.MUON.slot_shapes(param.shape, hyper).items()}
    expected_param, *expected_slots = rules.MUON.update(grad, param, *(x.copy() for x in slots.values()), **values)
    parts = rules.MUON.parts
    kept = [slots[n] for n in parts.whole_slots if n in slots]  # travel with the direction
    halves = [
        parts.direction(grad[rows], param[rows], slots["v"][rows], **values) for rows in (slice(0, 3), slice(3, 6))
    ]
    direction, *kept = parts.whole(np.concatenate([d for d, _ in halves]), *kept, **values)
    new_param = np.concatenate(
        [parts.apply(param[rows], direction[rows], param.shape, **values) for rows in (slice(0, 3), slice(3, 6))]
    )
    np.testing.assert_array_equal(new_param, expected_param)
    np.testing.assert_array_equal(np.concatenate([v for _, v in halves]), expected_slots[0])
    assert len(kept) == len(expected_slots) - 1 == ("normuon" in settings)
    for got, expected in zip(kept, expected_slots[1:]):
        np.testing.assert_array_equal(got, expected)


def mean_update(grad, param, v, lr, decay):
    v = decay * v + mean(grad)
    return param - lr * v, v


def test_an_elementwise_rule_may_call_only_ops_with_a_scalar_form():
    with pytest.raises(RuleError, match=r"calls \['mean'\].*elementwise=False"):
        Rule("means", mean_update, plain_coefficients, slots=("v",))
    assert not Rule("means", mean_update, plain_coefficients, slots=("v",), elementwise=False).elementwise
    assert set(ops.ELEMENTWISE) <= set(ops.__all__)
    numba_kernels = pytest.importorskip("treeopt.kernels.numba_kernels", reason="the scalar forms are numba's")
    assert set(numba_kernels.SCALAR_OPS) == set(ops.ELEMENTWISE)


def test_the_built_in_rules_declare_their_hyperparameters_once():
    for name in optim.__all__:
        cls = getattr(optim, name)
        if isinstance(cls, type) and issubclass(cls, optim.Optimizer) and cls.rule is not None:
            assert cls.hyperparameters == cls.rule.hyperparameters, name
            assert "hyperparameters =" not in inspect.getsource(cls), f"{name} restates its rule's hyper-parameters"


def test_adafactor_slot_names_and_shapes_come_from_one_function():
    opt = optim.Adafactor(beta_1=0.9)
    hyper = opt.scalars.hyperparameters()
    for shape in [(4, 3), (2, 4, 3), (5,), ()]:
        shapes = opt.store.expected(shape, "float32")
        assert tuple(shapes) == rules.ADAFACTOR.slot_names(shape, hyper)
    assert {name: stored.shape for name, stored in opt.store.expected((4, 3), "float32").items()} == {
        "exp_avg_sq_row": (4,),
        "exp_avg_sq_col": (3,),
        "exp_avg": (4, 3),
    }


class _Custom(optim.Optimizer):
    def __init__(self, rule, learning_rate=0.1, **hyper):
        self.rule = rule
        self.hyperparameters = rule.hyperparameters
        super().__init__()
        for name, value in hyper.items():
            setattr(self, name, value)
        self.learning_rate = learning_rate


def wrong_names_coefficients(lr, step, *, decay):
    return dict(lr=lr, decay_rate=decay)


def test_coefficients_that_do_not_fit_update_fail_before_anything_changes():
    rule = Rule("misnamed", plain, wrong_names_coefficients, slots=("v",))
    opt = _Custom(rule, decay=0.9)
    params = {"w": np.ones(3, np.float32)}
    with pytest.raises(RuleError, match=r"missing \['decay'\], unexpected \['decay_rate'\]"):
        opt.update(params, {"w": np.ones(3, np.float32)})
    assert params["w"].tolist() == [1.0, 1.0, 1.0]
    assert int(opt.state["step"]) == 0 and "w" not in opt.state


def every_scalar_op_coefficients(lr, step, *, decay):
    return dict(lr=lr, decay=decay, one=1.0, small=1e-3)


def every_scalar_op(grad, param, v, lr, decay, one, small):
    v = decay * v + grad * grad
    direction = where(grad > small, grad * rsqrt(v + small), cos(grad) * small)
    return param - lr * maximum(direction, -one), v


@pytest.mark.parametrize("backend", backend_params(["numpy", "torch"]))
def test_an_elementwise_rule_using_every_scalar_op_compiles_to_the_reference_numbers(backend):
    pytest.importorskip("numba", reason="the compiled loops need numba")
    rule = Rule("every_scalar_op", every_scalar_op, every_scalar_op_coefficients, slots=("v",))
    results = []
    for fast in (True, False):
        kernels.enabled = fast
        try:
            opt = _Custom(rule, decay=0.5)
            rng = np.random.default_rng(3)
            params = {"w": make(rng.standard_normal((64, 3)), backend)}
            for _ in range(3):
                opt.update(params, {"w": make(rng.standard_normal((64, 3)), backend)})
            results.append((as_float64(params["w"]), as_float64(opt.state["w"]["v"]), opt._compiled))
        finally:
            kernels.enabled = True
    (fast_w, fast_v, compiled), (w, v, _) = results
    assert type(compiled.buckets[0]).__name__ == "_NumbaBucket"
    np.testing.assert_array_equal(fast_w, w)
    np.testing.assert_array_equal(fast_v, v)


_FACTORS = {"scale": 1.0}  # a global dict: fine in Python, not something numba can type


def uncompilable_coefficients(lr, step, *, decay):
    return dict(lr=lr, decay=decay)


def uncompilable(grad, param, v, lr, decay):
    v = decay * v + grad * _FACTORS["scale"]
    return param - lr * v, v


def test_a_loop_that_cannot_compile_falls_back_to_the_rule_with_the_same_numbers():
    pytest.importorskip("numba", reason="the compiled loops need numba")
    rule = Rule("uncompilable", uncompilable, uncompilable_coefficients, slots=("v",))
    opt, reference = _Custom(rule, decay=0.5), _Custom(rule, decay=0.5)
    params, expected = {"w": np.ones(5, np.float32)}, {"w": np.ones(5, np.float32)}
    with pytest.warns(RuntimeWarning, match="compiled loop of rule 'uncompilable' failed to build"):
        opt.update(params, {"w": np.full(5, 0.5, np.float32)})
    expected = reference.apply_gradients({"w": np.full(5, 0.5, np.float32)}, expected)
    assert [type(b).__name__ for b in opt._compiled.buckets] == ["_RuleBucket"]
    np.testing.assert_array_equal(params["w"], expected["w"])
    opt.update(params, {"w": np.full(5, 0.25, np.float32)})  # the fallback bucket runs the rule
    expected = reference.apply_gradients({"w": np.full(5, 0.25, np.float32)}, expected)
    np.testing.assert_array_equal(params["w"], expected["w"])
    np.testing.assert_array_equal(opt.state["w"]["v"], reference.state["w"]["v"])


# ---------------------------------------------------------------------- running values
RUNNING = [s for s in SETTINGS if s.capabilities.running_values]


def test_the_registry_flags_running_values_as_the_rules_have_them():
    for setting in SETTINGS:
        assert bool(setting.make().rule.running) == setting.capabilities.running_values, setting.id
        assert setting.make().rule.elementwise == setting.capabilities.elementwise, setting.id


@pytest.mark.parametrize("setting", RUNNING, ids=lambda s: s.id)
def test_running_values_live_beside_the_step_and_move_every_step(setting):
    opt = setting.make()
    assert set(opt.rule.running) <= set(opt.scalars.names())
    params = {"w": np.ones((3, 2), np.float32)}
    seen = []
    for _ in range(3):
        opt.update(params, {"w": np.full((3, 2), 0.5, np.float32)})
        seen.append({n: float(opt.state[n]) for n in opt.rule.running})
    assert seen[0] != seen[1] != seen[2]
    plan = opt.plan()
    assert set(opt.rule.running) <= set(plan.groups[0].hyperparameters)
    with pytest.raises(ValueError, match=opt.rule.running[0]):
        opt.state = {k: v for k, v in opt.state.items() if k != opt.rule.running[0]}


@pytest.mark.parametrize("setting", RUNNING, ids=lambda s: s.id)
def test_running_values_are_saved_by_name_and_resume_exactly(setting, tmp_path):
    pytest.importorskip("safetensors", reason="checkpoints are safetensors files")
    rng = np.random.default_rng(0)
    grads = [{"w": rng.standard_normal((4, 3)).astype(np.float32)} for _ in range(6)]
    straight, params = setting.make(), {"w": np.ones((4, 3), np.float32)}
    for g in grads:
        straight.update(params, g)
    first, resumed_params = setting.make(), {"w": np.ones((4, 3), np.float32)}
    for g in grads[:3]:
        first.update(resumed_params, g)
    checkpoint.save(first, tmp_path / "opt.safetensors")
    tensors, _ = checkpoint.read(tmp_path / "opt.safetensors")
    assert {f"@{setting.optimizer}/{n}" for n in first.rule.running} <= set(tensors)
    resumed = setting.make()
    checkpoint.load(resumed, tmp_path / "opt.safetensors", params=resumed_params)
    for g in grads[3:]:
        resumed.update(resumed_params, g)
    np.testing.assert_array_equal(resumed_params["w"], params["w"])
    for name in first.rule.running:
        assert float(resumed.state[name]) == float(straight.state[name])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("setting", RUNNING, ids=lambda s: s.id)
def test_running_values_are_arrays_of_every_backend(setting, backend):
    expected = None
    for library in ("numpy", backend):
        opt = setting.make()
        params = {"w": make(np.ones((3, 2)), library)}
        for step in range(3):
            params = opt.apply_gradients({"w": make(np.full((3, 2), 0.5 + step), library)}, params)
        from treeopt.backends import backend_of

        assert all(backend_of(opt.state[n]).name == library for n in opt.rule.running)
        values = [as_float64(v) for _, v in tree_flatten({"p": params, "s": opt.state})]
        if expected is None:
            expected = values
    for a, b in zip(values, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_running_values_flow_through_the_pure_jax_api_under_jit():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import treeopt.jax as tj

    opt = optim.ScheduleFreeAdamW(0.05)
    params = {"w": jnp.ones((3, 2))}
    state = tj.init(opt, params)
    step = jax.jit(lambda p, s, g: tj.update(opt, g, s, p))
    for i in range(3):
        params, state = step(params, state, {"w": jnp.full((3, 2), 0.5 + i)})
    reference, expected = optim.ScheduleFreeAdamW(0.05), {"w": np.ones((3, 2), np.float32)}
    for i in range(3):
        reference.update(expected, {"w": np.full((3, 2), 0.5 + i, np.float32)})
    np.testing.assert_allclose(np.asarray(params["w"]), expected["w"], rtol=1e-6)
    assert float(state["weight_sum"]) == pytest.approx(float(reference.state["weight_sum"]))
