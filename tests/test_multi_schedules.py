"""MultiOptimizer's schedules across groups (``lr_schedule``) and the scheduled
hyper-parameters of one group."""

import numpy as np
import pytest

import treeopt as optim
from arrays import as_float64
from routing_helpers import BACKENDS, assert_identical, copy_tree, flat, grads_for, small
from treeopt import checkpoint, filters as F

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.multi.RoutingWarning")


# ================================================================================ 5. schedules
WARMUP_COSINE = optim.join_schedules([optim.linear_schedule(0.1, 1.0, 3), optim.cosine_decay(1.0, 5, 0.05)], [3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_lr_schedule_keeps_the_groups_ratio(backend):
    params = small(backend)
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [F.ndim(2)], lr_schedule=WARMUP_COSINE)
    twin = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-4)], [F.ndim(2)])  # constant lrs, set by hand
    twin_params = copy_tree(params, backend)
    for k in range(9):
        m = WARMUP_COSINE(k)
        assert multi.lr_multiplier == pytest.approx(m)
        plan = multi.plan(params)
        planned = [g.hyperparameters["learning_rate"] for g in plan.groups]
        assert planned == pytest.approx([0.02 * m, 3e-4 * m], rel=1e-6)  # the next step's, before it runs
        grads = grads_for(params, backend, k)
        multi.update(params, grads)
        used = [float(as_float64(lr)) for lr in multi.learning_rate]
        assert used == pytest.approx([0.02 * m, 3e-4 * m], rel=1e-6)
        assert used[0] / used[1] == pytest.approx(0.02 / 3e-4, rel=1e-6)
        twin.learning_rate = multi.learning_rate  # the stored values are the ones the step used
        twin.update(twin_params, grads)
        assert_identical(flat(params), flat(twin_params))
    assert multi.lr_multiplier == pytest.approx(0.05)
    assert optim.MultiOptimizer([optim.SGD(0.1)]).lr_multiplier is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_schedule_multiplies_a_groups_own_schedule(backend):
    params = small(backend)
    multi = optim.MultiOptimizer(
        [optim.SGD(optim.exponential_decay(0.1, 0.5)), optim.Adam(1e-3)],
        [F.ndim(2)],
        lr_schedule=optim.linear_schedule(0.5, 1.0, 2),
    )
    for k in range(4):
        multi.update(params, grads_for(params, backend, k))
        m = min(k, 2) * 0.25 + 0.5
        assert [float(as_float64(lr)) for lr in multi.learning_rate] == pytest.approx(
            [0.1 * 0.5**k * m, 1e-3 * m], rel=1e-6
        )


def scheduled_children():
    return [
        optim.Muon(0.02, momentum=optim.linear_schedule(0.85, 0.95, 10)),
        optim.AdamW(
            3e-4, weight_decay=optim.linear_schedule(0.0, 0.1, 10), betas=(0.9, optim.linear_schedule(0.9, 0.999, 10))
        ),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduled_hyperparameters_live_in_the_childs_state_and_are_used(backend):
    params = small(backend)
    multi = optim.MultiOptimizer(scheduled_children(), [F.ndim(2)])
    muon, adamw = optim.Muon(0.02, momentum=0.5), optim.AdamW(3e-4, weight_decay=0.5)  # constants, set each step
    twin = optim.MultiOptimizer([muon, adamw], [F.ndim(2)])
    twin_params = copy_tree(params, backend)
    for k in range(4):
        hyper = multi.plan(params).groups
        assert hyper[0].hyperparameters["momentum"] == pytest.approx(0.85 + 0.01 * k, rel=1e-6)  # the next step's
        assert hyper[1].hyperparameters["weight_decay"] == pytest.approx(0.01 * k, abs=1e-7)
        assert hyper[1].hyperparameters["betas"] == pytest.approx((0.9, 0.9 + 0.0099 * k), rel=1e-6)
        grads = grads_for(params, backend, k)
        multi.update(params, grads)
        muon_state, adamw_state = multi.state["states"]
        momentum, decay, beta2 = (
            float(as_float64(s[n]))
            for s, n in ((muon_state, "momentum"), (adamw_state, "weight_decay"), (adamw_state, "betas[1]"))
        )
        assert momentum == pytest.approx(0.85 + 0.01 * k, rel=1e-6)
        assert decay == pytest.approx(0.01 * k, abs=1e-7) and beta2 == pytest.approx(0.9 + 0.0099 * k, rel=1e-6)
        muon.momentum, adamw.weight_decay, adamw.betas = momentum, decay, (0.9, beta2)
        twin.update(twin_params, grads)
        assert_identical(flat(params), flat(twin_params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduled_hyperparameters_survive_a_checkpoint(backend, tmp_path):
    params = small(backend)
    multi = optim.MultiOptimizer(scheduled_children(), [F.ndim(2)], lr_schedule=WARMUP_COSINE)
    for k in range(3):
        multi.update(params, grads_for(params, backend, k))
    checkpoint.save(multi, tmp_path / "opt.safetensors")
    restored = optim.MultiOptimizer(scheduled_children(), [F.ndim(2)], lr_schedule=WARMUP_COSINE)
    restored_params = copy_tree(params, backend)
    report = checkpoint.load(restored, tmp_path / "opt.safetensors", params=restored_params)
    assert report.ok
    for i, names in enumerate(
        [("step", "learning_rate", "momentum"), ("step", "learning_rate", "weight_decay", "betas[1]")]
    ):
        for name in names:
            saved, loaded = multi.state["states"][i][name], restored.state["states"][i][name]
            assert np.array_equal(as_float64(saved), as_float64(loaded)), (i, name)
    assert_identical(flat(multi.state["states"]), flat(restored.state["states"]))
    grads = grads_for(params, backend, 9)
    multi.update(params, grads)
    restored.update(restored_params, grads)
    assert_identical(flat(params), flat(restored_params))
    assert_identical(flat(multi.state["states"]), flat(restored.state["states"]))
