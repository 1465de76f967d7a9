"""treeopt.whole_model: global clipping, skipping non-finite steps, accumulation."""

import numpy as np
import pytest

import treeopt as optim
from arrays import as_float64, make
from routing_helpers import BACKENDS, assert_identical, copy_tree, flat, gpt2, grads_for, three_groups
from treeopt import filters as F
from treeopt.tree import tree_flatten, tree_map

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.multi.RoutingWarning")


# ================================================================================ 6. whole model
@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_clips_all_groups_together(backend):
    params = gpt2(backend)
    twin_params = copy_tree(params, backend)
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-2)], [F.is_hidden_matrix], max_grad_norm=0.5)
    twin = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-2)], [F.is_hidden_matrix])
    for k, scale in enumerate([3.0, 0.01, 1.0]):  # one step under the limit
        grads = grads_for(params, backend, k, scale)
        clipped, norm = optim.clip_grad_norm(grads_for(params, backend, k, scale), 0.5)
        multi.update(params, grads)
        twin_params = twin.apply_gradients(clipped, twin_params)
        assert_identical(flat(params), flat(twin_params))
        assert np.array_equal(as_float64(multi.state["grad_norm"]), as_float64(norm))
        expected = np.sqrt(sum(np.sum(as_float64(g) ** 2) for _, g in tree_flatten(grads)))
        assert float(as_float64(multi.state["grad_norm"])) == pytest.approx(expected, rel=1e-5)
    assert_identical(flat(multi.state["states"]), flat(twin.state["states"]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nonfinite_gradient_skips_the_step_for_every_group(backend, bad):
    params = gpt2(backend)
    multi = three_groups(skip_nonfinite=True)

    def poisoned(k):
        grads = grads_for(params, backend, k)
        bias = grads["transformer"]["h"][0]["ln_1"]["bias"]  # one element of one AdamW gradient
        grads["transformer"]["h"][0]["ln_1"]["bias"] = make(np.where(np.arange(8) == 3, bad, as_float64(bias)), backend)
        return grads

    multi.update(params, poisoned(0))  # even the first step: nothing is created
    assert multi.state["skipped_steps"] == 1
    assert all(sorted(s) == ["learning_rate", "step"] for s in multi.state["states"])
    for k in range(1, 3):
        multi.update(params, grads_for(params, backend, k))
    params_before, state_before = flat(params), flat(multi.state["states"])
    for skipped in (2, 3):
        multi.update(params, poisoned(skipped + 5))
        assert multi.state["skipped_steps"] == skipped
        assert_identical(flat(params), params_before)
        assert_identical(flat(multi.state["states"]), state_before)  # slots, steps, learning rates
        assert [int(as_float64(s["step"])) for s in multi.state["states"]] == [2, 2, 2]
        assert not np.isfinite(float(as_float64(multi.state["grad_norm"])))
    multi.update(params, grads_for(params, backend, 20))
    assert [int(as_float64(s["step"])) for s in multi.state["states"]] == [3, 3, 3]
    assert multi.state["skipped_steps"] == 3


def average(a, b):
    return tree_map(lambda x, y: (x + y) / 2, a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_averages_gradients_over_calls(backend):
    params = gpt2(backend)
    twin_params = copy_tree(params, backend)
    multi = three_groups(accumulate=2)
    twin = three_groups()
    for k in range(0, 6, 2):
        g1, g2 = grads_for(params, backend, k), grads_for(params, backend, k + 1)
        before = flat(params)
        multi.update(params, g1)
        assert_identical(flat(params), before)  # the first call of a pair only accumulates
        multi.update(params, g2)
        twin_params = twin.apply_gradients(average(g1, g2), twin_params)
        assert_identical(flat(params), flat(twin_params))
        assert int(as_float64(multi.step)) == k // 2 + 1
    assert_identical(flat(multi.state["states"]), flat(twin.state["states"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_per_group(backend):
    params = {"dense": {"weight": make(np.full((3, 3), 0.5), backend)}, "dense2": {"bias": make(np.ones(3), backend)}}
    multi = optim.MultiOptimizer(
        [optim.SGD(0.1, momentum=0.9), optim.AdamW(1e-2, bias_correction=True)], [F.ndim(2)], accumulate=[1, 2]
    )
    sgd, adamw = optim.SGD(0.1, momentum=0.9), optim.AdamW(1e-2, bias_correction=True)
    alone = {"dense": copy_tree(params["dense"], backend), "dense2": copy_tree(params["dense2"], backend)}
    grads = [grads_for(params, backend, k) for k in range(4)]
    for k, g in enumerate(grads):
        multi.update(params, g)
        alone["dense"] = sgd.apply_gradients(g["dense"], alone["dense"])  # group 0: every call
        if k % 2 == 1:  # group 1: every second call, with the average of the two
            alone["dense2"] = adamw.apply_gradients(average(grads[k - 1]["dense2"], g["dense2"]), alone["dense2"])
        assert_identical(flat(params), flat(alone))
        assert [int(as_float64(s["step"])) for s in multi.state["states"]] == [k + 1, (k + 1) // 2]
