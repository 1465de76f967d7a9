"""The fast paths run the same rules: a step planned once and compiled loops give exactly the
per-tensor reference's numbers, and fall back to it whenever the plan does not fit."""

import copy

import numpy as np
import pytest

import treeopt as optim
import treeopt.kernels as kernels
from treeopt.kernels.compiled_step import _NumbaBucket, _RuleBucket, _TorchBucket
from treeopt.tree import tree_flatten, tree_map

from arrays import as_float64, backend_params, make
from registry import SETTINGS

numba = pytest.importorskip("numba", reason="the compiled loops need numba")

SHAPES = {
    "embed": (11, 6),
    "layers": [{"w": (6, 6), "b": (6,)}, {"w": (6, 4), "b": (4,)}],
    "scale": (),
    "empty": (0, 3),
}


def problem(backend, dtype, seed=0, steps=4):
    rng = np.random.default_rng(seed)

    def tree(scale):
        return tree_map(
            lambda shape: make(rng.standard_normal(shape) * scale, backend, dtype),
            SHAPES,
            is_leaf=lambda x: isinstance(x, tuple),
        )

    return tree(1.0), [tree(0.1) for _ in range(steps)]


def run(setting, backend, dtype, fast, steps=4, make_optimizer=None):
    kernels.enabled = fast
    try:
        params, grads = problem(backend, dtype, steps=steps)
        opt = make_optimizer() if make_optimizer else setting.make()
        for g in grads:
            opt.update(params, g)
        return params, opt
    finally:
        kernels.enabled = True


def on_the_reference_path(opt, params, grads):
    """Every step of ``grads`` on the per-tensor reference path."""
    kernels.enabled = False
    try:
        for g in grads:
            opt.update(params, g)
    finally:
        kernels.enabled = True


def assert_identical(a, b):
    flat_a, flat_b = tree_flatten(a), tree_flatten(b)
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    for (key, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(as_float64(x), as_float64(y), err_msg=key)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("backend", backend_params(["numpy", "torch"]))
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.id)
def test_compiled_step_equals_the_reference(setting, backend, dtype):
    fast_params, fast = run(setting, backend, dtype, fast=True)
    ref_params, ref = run(setting, backend, dtype, fast=False)
    assert fast._compiled is not None and ref._compiled is None
    kinds = {type(b) for b in fast._compiled.buckets}
    rule = setting.make().rule
    compiled = rule.elementwise and dtype in ("float32", "float64")
    # torch's half precision on CPU: torch's foreach operations, driven by the rule
    foreach = backend == "torch" and rule.elementwise and not callable(rule.slots) and not compiled
    assert kinds == ({_NumbaBucket} if compiled else {_TorchBucket} if foreach else {_RuleBucket})
    assert_identical(fast_params, ref_params)
    assert_identical(fast.state, ref.state)


def muon_adamw():
    return optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(optim.cosine_decay(0.01, 5)), optim.SGD(0.1, momentum=0.9)],
        [lambda p, w: p.startswith("layers") and w.ndim == 2, lambda p, w: w.ndim == 2],
    )


@pytest.mark.parametrize("backend", backend_params(["numpy", "torch"]))
def test_multioptimizer_buckets_by_group(backend):
    fast_params, fast = run(None, backend, "float32", True, make_optimizer=muon_adamw)
    ref_params, ref = run(None, backend, "float32", False, make_optimizer=muon_adamw)
    # one loop per rule, dtype and switches (not one per tensor): Muon per tensor, AdamW, SGD
    assert len(fast._compiled.buckets) == 3
    assert_identical(fast_params, ref_params)
    assert_identical(fast.state, ref.state)


def reference(make_optimizer, params, grads, between=None):
    """Run the per-tensor reference path (kernels off) on a copy of ``params``."""
    params, opt = copy.deepcopy(params), make_optimizer()
    kernels.enabled = False
    try:
        for i, g in enumerate(grads):
            if between:
                between(i, opt)
            opt.update(params, g)
    finally:
        kernels.enabled = True
    return params, opt


def test_schedules_and_learning_rate_changes_are_seen_by_the_compiled_step():
    def set_lr(i, opt):
        if i == 3:
            opt.learning_rate = 0.01

    for make_optimizer, between in (
        (lambda: optim.SGD(optim.exponential_decay(0.5, 0.5)), None),
        (lambda: optim.Adam(0.1), set_lr),
    ):
        params, grads = problem("numpy", "float32", steps=6)
        expected, expected_opt = reference(make_optimizer, params, grads, between)
        opt = make_optimizer()
        for i, g in enumerate(grads):
            if between:
                between(i, opt)
            opt.update(params, g)
        assert opt._compiled is not None
        assert_identical(params, expected)
        assert_identical(opt.state, expected_opt.state)


def test_falls_back_when_the_tree_changes():
    params, grads = problem("numpy", "float32", steps=3)
    opt = optim.AdamW(0.01)
    opt.update(params, grads[0])
    opt.update(params, grads[1])
    compiled = opt._compiled
    params["new"] = np.ones(3, np.float32)  # a new path: the general engine initialises it
    g = dict(grads[2], new=np.ones(3, np.float32))
    opt.update(params, g)
    assert "new" in opt.state and not np.array_equal(params["new"], np.ones(3, np.float32))
    assert opt._compiled is not compiled


def test_falls_back_when_an_array_is_replaced_and_updates_the_new_one():
    params, grads = problem("numpy", "float32", steps=3)
    opt = optim.SGD(0.5)
    opt.update(params, grads[0])
    replacement = np.zeros((11, 6), np.float32)
    params["embed"] = replacement
    opt.update(params, grads[1])
    np.testing.assert_array_equal(replacement, -0.5 * grads[1]["embed"])


def test_a_bad_gradient_on_the_compiled_path_is_the_engine_error_and_changes_nothing():
    params, grads = problem("numpy", "float32", steps=2)
    opt = optim.Adam(0.1)
    opt.update(params, grads[0])
    opt.update(params, grads[1])
    before = [np.array(v, copy=True) for _, v in tree_flatten(opt.state)]
    values = [np.array(v, copy=True) for _, v in tree_flatten(params)]
    for bad in (np.ones((6, 11), np.float32), np.ones((11, 6), np.float64)):  # shape, dtype
        with pytest.raises(optim.ParameterError, match="'embed'"):
            opt.update(params, dict(grads[1], embed=bad))
        for (_, a), b in zip(tree_flatten(opt.state), before):
            np.testing.assert_array_equal(a, b)
        for (_, a), b in zip(tree_flatten(params), values):
            np.testing.assert_array_equal(a, b)


def test_non_contiguous_gradients_take_the_engine_with_the_same_numbers():
    params, grads = problem("numpy", "float32", steps=2)
    twin = copy.deepcopy(params)
    fast, ref = optim.Adam(0.1), optim.Adam(0.1)
    for step, g in enumerate(grads):
        strided = dict(g, embed=np.asfortranarray(g["embed"]))
        fast.update(params, strided)
        kernels.enabled = False
        try:
            ref.update(twin, strided)
        finally:
            kernels.enabled = True
    assert_identical(params, twin)


@pytest.mark.parametrize("backend", backend_params(["numpy", "torch"]))
def test_a_loop_loading_in_a_thread_takes_over_with_the_same_numbers(backend, monkeypatch):
    # a new process runs the rule per tensor while numba loads, then switches to the loop
    from treeopt.kernels import compiled_step

    monkeypatch.setattr(kernels, "load_in_background", True)
    monkeypatch.setattr(compiled_step, "_loops_ready", False)
    params, grads = problem(backend, "float32", steps=5)
    twin = copy.deepcopy(params)
    fast, ref = optim.AdamW(0.1, weight_decay=0.1), optim.AdamW(0.1, weight_decay=0.1)
    fast.update(params, grads[0])
    (bucket,) = fast._compiled.buckets
    assert isinstance(bucket, compiled_step._LoadingBucket)
    fast.update(params, grads[1])  # the rule per tensor, or the loop if it is ready already
    bucket.thread.join()
    assert isinstance(bucket.loop, _NumbaBucket) and compiled_step._loops_ready
    ran = []
    monkeypatch.setattr(
        _NumbaBucket, "run", lambda self, ready, run=_NumbaBucket.run: ran.append(1) or run(self, ready)
    )
    for g in grads[2:]:
        fast.update(params, g)
    assert len(ran) == 3 and fast._compiled.buckets == [bucket]
    on_the_reference_path(ref, twin, grads)
    assert_identical(params, twin)
    assert_identical(fast.state, ref.state)


def test_a_loop_that_fails_to_load_in_a_thread_leaves_the_rule_per_tensor(monkeypatch):
    from treeopt.kernels import compiled_step

    monkeypatch.setattr(kernels, "load_in_background", True)
    monkeypatch.setattr(compiled_step, "_loops_ready", False)

    def broken(self):
        raise RuntimeError("no loop today")

    monkeypatch.setattr(_NumbaBucket, "compiled", broken)
    params, grads = problem("numpy", "float32", steps=4)
    twin = copy.deepcopy(params)
    fast, ref = optim.Adam(0.1), optim.Adam(0.1)
    fast.update(params, grads[0])
    (bucket,) = fast._compiled.buckets
    with pytest.warns(RuntimeWarning, match="no loop today.*runs per tensor"):
        bucket.thread.join()
        fast.update(params, grads[1])
    for g in grads[2:]:
        fast.update(params, g)
    assert bucket.loop is None and not compiled_step._loops_ready
    on_the_reference_path(ref, twin, grads)
    assert_identical(params, twin)


def test_one_thread_gives_the_same_numbers():
    kernels.numba_available()
    threads = kernels.get_num_threads()
    try:
        kernels.set_num_threads(1)
        one_params, _ = run(SETTINGS[13], "numpy", "float32", fast=True)
    finally:
        kernels.set_num_threads(threads)
    many_params, _ = run(SETTINGS[13], "numpy", "float32", fast=True)
    assert_identical(one_params, many_params)


def test_disabled_kernels_never_compile():
    kernels.enabled = False
    try:
        params, grads = problem("numpy", "float32", steps=2)
        opt = optim.AdamW(0.1)
        for g in grads:
            opt.update(params, g)
        assert opt._compiled is None
    finally:
        kernels.enabled = True


def test_groups_of_one_rule_run_in_one_loop_with_their_own_coefficients():
    def three_adamw():
        return optim.MultiOptimizer(
            [optim.AdamW(0.1), optim.AdamW(0.01, weight_decay=0.0), optim.AdamW(0.001)],
            [lambda p, w: p.startswith("layers.0"), lambda p, w: w.ndim == 1],
        )

    fast_params, fast = run(None, "numpy", "float32", True, make_optimizer=three_adamw)
    ref_params, ref = run(None, "numpy", "float32", False, make_optimizer=three_adamw)
    assert len(fast._compiled.buckets) == 1 and len(fast._compiled.buckets[0].owners) == 3
    assert_identical(fast_params, ref_params)
    assert_identical(fast.state, ref.state)


def test_a_changed_switch_takes_a_new_plan():
    params, grads = problem("numpy", "float32", steps=4)
    twin = copy.deepcopy(params)
    fast, ref = optim.SGD(0.1, momentum=0.9), optim.SGD(0.1, momentum=0.9)
    kernels.enabled = False
    try:
        for i, g in enumerate(grads):
            if i == 2:
                ref.momentum = 0.0
            ref.update(twin, g)
    finally:
        kernels.enabled = True
    for i, g in enumerate(grads):
        if i == 2:
            fast.momentum = 0.0  # switches the momentum term off: the compiled loop must notice
        fast.update(params, g)
    assert_identical(params, twin)


@pytest.mark.parametrize(
    "sizes",
    [
        [3_000_000] * 4 + [256] * 40,  # matrices, then vectors (a split by ndim)
        [256] * 40 + [3_000_000] * 4,
        [4096] * 2000,
        [5] * 7,
        [1],
        [0, 70_000, 0, 3],
        [2_000_000, 1],
    ],
)
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_work_items_cover_every_element_once_in_equal_items(sizes, threads):
    from treeopt.kernels.numba_kernels import work_items

    pieces, items = work_items(sizes, threads=threads)
    covered = [np.zeros(n, np.int64) for n in sizes]
    for tensor, start, stop in pieces:
        assert 0 <= start < stop <= sizes[tensor]
        covered[tensor][start:stop] += 1
    assert all((c == 1).all() for c in covered)
    loads = [
        int((pieces[items[w] : items[w + 1], 2] - pieces[items[w] : items[w + 1], 1]).sum())
        for w in range(len(items) - 1)
    ]
    assert max(loads) - min(loads) <= 1
    if sum(sizes) >= threads:
        assert len(loads) % threads == 0


@pytest.mark.parametrize("backend", backend_params(["numpy", "torch"]))
def test_matrices_and_vectors_in_separate_groups_run_in_one_loop(backend):
    def by_ndim():
        return optim.MultiOptimizer(
            [optim.AdamW(0.1, bias_correction=True), optim.AdamW(0.01, bias_correction=True)],
            [lambda p, w: w.ndim == 2],
        )

    fast_params, fast = run(None, backend, "float32", True, make_optimizer=by_ndim)
    ref_params, ref = run(None, backend, "float32", False, make_optimizer=by_ndim)
    (bucket,) = fast._compiled.buckets
    assert len(bucket.owners) == 2
    assert_identical(fast_params, ref_params)
    assert_identical(fast.state, ref.state)
