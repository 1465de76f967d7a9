"""Models and helpers shared by the routing tests (test_plan, test_filters, test_presets,
test_whole_model, test_multi_checks, test_multi_schedules, test_multi_changes), on NumPy and torch."""

import numpy as np

import treeopt as optim
from arrays import as_float64, backend_params, make
from treeopt import filters as F
from treeopt.multi import RoutingWarning
from treeopt.tree import tree_flatten, tree_map

BACKENDS = backend_params(["numpy", "torch"])
SCALARS = ("step", "learning_rate")


def gpt2(backend, seed=0):
    """A tiny GPT-2 with PyTorch's parameter names."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return make(0.5 * rng.standard_normal(shape), backend)

    return {
        "transformer": {
            "wte": {"weight": r(16, 8)},
            "h": [
                {
                    "ln_1": {"weight": r(8), "bias": r(8)},
                    "attn": {"c_attn": {"weight": r(8, 24), "bias": r(24)}},
                    "mlp": {"c_fc": {"weight": r(8, 16)}},
                }
            ],
            "ln_f": {"weight": r(8)},
        },
        "lm_head": {"weight": r(16, 8)},
    }


GPT2_PATHS = [
    "transformer.wte.weight",
    "transformer.h.0.ln_1.weight",
    "transformer.h.0.ln_1.bias",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.attn.c_attn.bias",
    "transformer.h.0.mlp.c_fc.weight",
    "transformer.ln_f.weight",
    "lm_head.weight",
]


def small(backend, seed=0):
    """A small nested model: one hidden matrix, a bias, a norm weight."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return make(0.5 * rng.standard_normal(shape), backend)

    return {"layers": [{"attn": {"weight": r(4, 4), "bias": r(4)}, "norm": {"weight": r(4)}}]}


def params_at(params, path):
    """The array at a dotted path."""
    node = params
    for key in path.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def grads_for(params, backend, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return tree_map(lambda p: make(scale * rng.standard_normal(tuple(p.shape)), backend), params)


def copy_tree(tree, backend):
    return tree_map(lambda p: make(as_float64(p), backend), tree)


def flat(tree):
    """``{path: float64 copy}`` of every array in ``tree``, for bit-identical comparisons."""
    return {k: as_float64(v).copy() for k, v in tree_flatten(tree) if v is not None}


def assert_identical(a, b):
    assert list(a) == list(b)
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), key


def slot_paths(state):
    """The parameter paths that have slots in one optimizer's state."""
    return sorted({k.rsplit(".", 1)[0] for k, _ in tree_flatten(state) if k not in SCALARS and "." in k})


def messages(record, category=RoutingWarning):
    return [str(w.message) for w in record if issubclass(w.category, category)]


def three_groups(**options):
    return optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(3e-4, weight_decay=0.1), optim.SGD(0.1, momentum=0.9)],
        [F.is_hidden_matrix, F.is_bias | F.is_norm],
        names=["muon", "adamw", "sgd"],
        **options,
    )


#: where three_groups() sends each GPT-2 parameter
GPT2_ROUTES = {
    "transformer.wte.weight": (2, "sgd", "fallback: embedding: name of an embedding"),
    "transformer.h.0.ln_1.weight": (1, "adamw", "filters[1] (is_bias | is_norm): norm: name of a normalisation layer"),
    "transformer.h.0.ln_1.bias": (1, "adamw", "filters[1] (is_bias | is_norm): norm: name of a normalisation layer"),
    "transformer.h.0.attn.c_attn.weight": (0, "muon", "filters[0] (is_hidden_matrix): hidden: inside a repeated block"),
    "transformer.h.0.attn.c_attn.bias": (1, "adamw", "filters[1] (is_bias | is_norm): bias: name 'bias'"),
    "transformer.h.0.mlp.c_fc.weight": (0, "muon", "filters[0] (is_hidden_matrix): hidden: inside a repeated block"),
    "transformer.ln_f.weight": (1, "adamw", "filters[1] (is_bias | is_norm): norm: name of a normalisation layer"),
    "lm_head.weight": (2, "sgd", "fallback: head: name of an output layer"),
}
