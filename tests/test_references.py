"""Numbers = a published implementation, for the optimizers MLX lacks: every setting whose
registry entry names a reference (optax's ``contrib.schedule_free_adamw`` and ``adan``), on
every backend, in float32, against that reference run in JAX."""

import numpy as np
import pytest

import treeopt as optim
from arrays import as_float64, backend_params, make
from registry import SETTINGS

jax = pytest.importorskip("jax", reason="the references are optax transformations")
optax = pytest.importorskip("optax", reason="the references are optax transformations")
import jax.numpy as jnp  # noqa: E402

SHAPES = {"matrix": (5, 3), "vector": (7,), "scalar": ()}
STEPS = 12
#: XLA fuses and rounds a division differently from an eager one: about an ulp a step, and
#: the schedule-free average carries it forward (measured at most 1e-6 relative over 20 steps)
RTOL, ATOL = 4e-6, 1e-7

REFERENCED = [s for s in SETTINGS if s.capabilities.reference is not None]


def problem(seed):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def reference_trajectory(setting, params, grads):
    tx = setting.capabilities.reference(setting.kwargs)
    current = {k: jnp.asarray(v) for k, v in params.items()}
    state, trajectory = tx.init(current), []
    for step_grads in grads:
        updates, state = tx.update({k: jnp.asarray(v) for k, v in step_grads.items()}, state, current)
        current = optax.apply_updates(current, updates)
        trajectory.append({k: np.asarray(v) for k, v in current.items()})
    return trajectory


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("setting", REFERENCED, ids=lambda s: s.id)
def test_optimizer_matches_its_reference(setting, backend):
    params, grads = problem(len(setting.id))
    expected = reference_trajectory(setting, params, grads)
    opt = setting.make()
    ours = {k: make(v, backend) for k, v in params.items()}
    for step, (step_grads, reference) in enumerate(zip(grads, expected), start=1):
        ours = opt.apply_gradients({k: make(v, backend) for k, v in step_grads.items()}, ours)
        for name, value in reference.items():
            np.testing.assert_allclose(
                as_float64(ours[name]),
                value,
                rtol=RTOL,
                atol=ATOL,
                err_msg=f"{setting.id} on {backend}: {name} after step {step}",
            )


def test_a_wrong_formula_would_be_caught():
    """The tolerance is far below what a wrong coefficient gives: Adan with a decay off by
    1% leaves it after a few steps."""
    setting = next(s for s in REFERENCED if s.optimizer == "Adan")
    params, grads = problem(0)
    expected = reference_trajectory(setting, params, grads)
    b1, b2, b3 = setting.kwargs.get("betas", (0.98, 0.92, 0.99))
    opt = optim.Adan(**{**setting.kwargs, "betas": (b1, b2 * 1.01, b3)})
    ours = {k: make(v, "numpy") for k, v in params.items()}
    for step_grads in grads:
        ours = opt.apply_gradients(step_grads, ours)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(ours["matrix"], expected[-1]["matrix"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", backend_params())
def test_schedule_free_evaluation_point_is_optax_s(backend):
    setting = next(s for s in REFERENCED if s.optimizer == "ScheduleFreeAdamW")
    params, grads = problem(1)
    tx = setting.capabilities.reference(setting.kwargs)
    current = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(current)
    opt = setting.make()
    ours = {k: make(v, backend) for k, v in params.items()}
    for step_grads in grads:
        updates, state = tx.update({k: jnp.asarray(v) for k, v in step_grads.items()}, state, current)
        current = optax.apply_updates(current, updates)
        ours = opt.apply_gradients({k: make(v, backend) for k, v in step_grads.items()}, ours)
    expected = optax.contrib.schedule_free_eval_params(state, current)
    evaluated = opt.eval_params(ours)
    for name in SHAPES:
        np.testing.assert_allclose(as_float64(evaluated[name]), np.asarray(expected[name]), rtol=RTOL, atol=ATOL)
        assert as_float64(ours[name]).tolist() != as_float64(evaluated[name]).tolist()  # x is not y
    weight_sum, max_lr = (float(as_float64(opt.state[k])) for k in ("weight_sum", "max_lr"))
    assert max_lr == pytest.approx(float(state.max_lr)) and weight_sum == pytest.approx(float(state.weight_sum))
