"""treeopt.filters on realistic parameter names, and MultiOptimizer's ``frozen=``."""

import numpy as np
import pytest

import treeopt
from arrays import make
from routing_helpers import BACKENDS, GPT2_PATHS, flat, gpt2, grads_for, slot_paths, three_groups
from treeopt import filters as F

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.multi.RoutingWarning")


# ================================================================================ 3. filters
class Shaped:
    """A weight stand-in for tests of names only."""

    def __init__(self, *shape):
        self.shape, self.ndim = shape, len(shape)


def test_filter_names_compose_readably():
    assert str(F.is_bias | F.is_norm) == "is_bias | is_norm"
    assert str(~(F.is_bias | F.is_norm)) == "~(is_bias | is_norm)"
    assert str(~F.is_bias) == "~is_bias"
    assert str(F.ndim(min=2) & F.is_embedding & F.is_head) == "ndim(min=2) & is_embedding & is_head"
    assert str((F.ndim(2) & F.is_bias) | F.is_norm) == "(ndim(2) & is_bias) | is_norm"
    assert str(F.is_norm & (F.is_bias | F.ndim(1))) == "is_norm & (is_bias | ndim(1))"
    assert str(F.ndim(max=1)) == "ndim(max=1)" and str(F.ndim(min=1, max=2)) == "ndim(min=1, max=2)"
    assert str(F.shape(None, 4)) == "shape(None, 4)"
    assert str(F.glob("blocks.*.weight", "head.*")) == "glob('blocks.*.weight', 'head.*')"
    assert str(F.regex(r"^layers\.\d+")) == r"regex('^layers\\.\\d+')"

    def by_name(path, weight):
        return path == "x"

    assert str(F.is_bias | by_name) == "is_bias | by_name" and str(by_name | F.is_bias) == "by_name | is_bias"
    assert str(F.as_filter(lambda p, w: True)) == "<lambda>" and F.as_filter(F.is_bias) is F.is_bias
    with pytest.raises(TypeError, match="a filter must be callable, got str"):
        F.as_filter("is_bias")
    combined = ~(F.is_bias | F.is_norm) & F.ndim(min=2)
    assert combined("layers.0.weight", Shaped(3, 3)) is True
    assert combined("layers.0.bias", Shaped(3, 3)) is False and combined("layers.0.weight", Shaped(3)) is False
    assert (by_name | F.is_bias)("x", Shaped(2)) and not (by_name & F.is_bias)("x", Shaped(2))


def test_negations_need_no_parentheses_in_names():
    assert str(F.ndim(min=2) & ~F.is_embedding & ~F.is_head) == "ndim(min=2) & ~is_embedding & ~is_head"
    assert str(~F.is_bias | F.is_norm) == "~is_bias | is_norm"


@pytest.mark.parametrize("backend", BACKENDS)
def test_structural_filters(backend):
    def w(*shape):
        return make(np.zeros(shape), backend)

    assert F.glob("transformer.h.*.attn.*")("transformer.h.11.attn.c_attn.weight", w(2, 2))  # * crosses dots
    assert not F.glob("transformer.h.*.attn.*")("transformer.h.0.mlp.c_fc.weight", w(2, 2))
    assert F.glob("a.*", "*.bias")("x.bias", w(2)) and not F.glob("a.*")("ba.c", w(2))
    assert F.regex(r"self_attn\.[qk]_proj")("model.layers.3.self_attn.q_proj.weight", w(2, 2))
    assert not F.regex(r"^self_attn")("model.layers.3.self_attn.q_proj.weight", w(2, 2))
    assert [F.ndim(1)("p", w(*s)) for s in [(), (3,), (3, 3)]] == [False, True, False]
    assert [F.ndim(min=2)("p", w(*s)) for s in [(3,), (3, 3), (2, 3, 3)]] == [False, True, True]
    assert [F.ndim(max=1)("p", w(*s)) for s in [(), (3,), (3, 3)]] == [True, True, False]
    assert [F.ndim(min=1, max=2)("p", w(*s)) for s in [(), (3,), (3, 3), (1, 1, 1)]] == [False, True, True, False]
    assert [F.shape(None, 4)("p", w(*s)) for s in [(3, 4), (7, 4), (4, 3), (4,), (2, 3, 4)]] == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert F.shape(2, 3)("p", w(2, 3)) and not F.shape(2, 3)("p", w(2, 4))
    assert F.everything("anything", w()) and F.everything("", w(5, 5))


#: realistic names (PyTorch GPT-2, Llama, flax linen, MLX) and the name filters that accept them
NAMES = {
    # PyTorch GPT-2
    "transformer.wte.weight": ((50, 8), {"is_embedding"}),
    "transformer.wpe.weight": ((16, 8), {"is_embedding"}),
    "transformer.h.0.ln_1.weight": ((8,), {"is_norm"}),
    "transformer.h.0.ln_1.bias": ((8,), {"is_bias", "is_norm"}),
    "transformer.h.0.attn.c_attn.weight": ((8, 24), {"is_hidden_matrix"}),
    "transformer.h.0.attn.c_attn.bias": ((24,), {"is_bias"}),
    "transformer.h.0.mlp.c_proj.weight": ((32, 8), {"is_hidden_matrix"}),
    "transformer.ln_f.weight": ((8,), {"is_norm"}),
    "lm_head.weight": ((50, 8), {"is_head"}),
    # Llama (Hugging Face and Meta's original)
    "model.embed_tokens.weight": ((50, 8), {"is_embedding"}),
    "model.layers.0.input_layernorm.weight": ((8,), {"is_norm"}),
    "model.layers.0.post_attention_layernorm.weight": ((8,), {"is_norm"}),
    "model.layers.0.self_attn.q_proj.weight": ((8, 8), {"is_hidden_matrix"}),
    "model.layers.0.mlp.gate_proj.weight": ((16, 8), {"is_hidden_matrix"}),
    "model.norm.weight": ((8,), {"is_norm"}),
    "tok_embeddings.weight": ((50, 8), {"is_embedding"}),
    "layers.0.attention_norm.weight": ((8,), {"is_norm"}),
    "layers.0.attention.wq.weight": ((8, 8), {"is_hidden_matrix"}),
    "output.weight": ((50, 8), {"is_head"}),
    # flax linen
    "params.Embed_0.embedding": ((50, 8), {"is_embedding"}),
    "params.LayerNorm_0.scale": ((8,), {"is_norm"}),
    "params.LayerNorm_0.bias": ((8,), {"is_bias", "is_norm"}),
    "params.Dense_0.kernel": ((8, 8), {"is_hidden_matrix"}),
    "params.Dense_0.bias": ((8,), {"is_bias"}),
    # MLX
    "embed.weight": ((50, 8), {"is_embedding"}),
    "layers.0.norm.weight": ((8,), {"is_norm"}),
    "layers.0.attention.query_proj.weight": ((8, 8), {"is_hidden_matrix"}),
    "layers.0.attention.query_proj.bias": ((8,), {"is_bias"}),
    "norm.weight": ((8,), {"is_norm"}),
    # others
    "classifier.weight": ((3, 8), {"is_head"}),
    "bn1.weight": ((8,), {"is_norm"}),
    "conv1.weight": ((8, 3, 3, 3), {"is_hidden_matrix"}),
    "b": ((8,), {"is_bias"}),
    "mlp.b": ((8, 8), {"is_hidden_matrix"}),  # "b" is a bias only as a vector
    "layers.0.w": ((8,), set()),
}
NAME_FILTERS = [F.is_bias, F.is_norm, F.is_embedding, F.is_head, F.is_hidden_matrix]


@pytest.mark.parametrize("backend", BACKENDS)
def test_name_filters_on_realistic_names(backend):
    for path, (shape, expected) in NAMES.items():
        weight = make(np.zeros(shape), backend)
        accepted = {f.name for f in NAME_FILTERS if f(path, weight)}
        assert accepted == expected, path


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_level_arrays_are_named_by_their_own_name(backend):
    head, vector = make(np.ones((10, 8)), backend), make(np.ones(8), backend)
    assert F.is_head("head", head) and F.is_head("lm_head", head) and F.is_head("output", head)
    assert F.is_embedding("embed", head) and F.is_embedding("wte", head)
    assert F.is_norm("ln_f", vector) and F.is_norm("norm", vector) and F.is_bias("bias", vector)
    assert not F.is_hidden_matrix("head", head) and F.is_hidden_matrix("w", head)
    params = {
        "embed": {"weight": make(np.ones((10, 8)), backend)},
        "layers": [{"w": make(np.ones((8, 8)), backend)}],
        "head": make(np.ones((10, 8)), backend),
    }  # the README's naming
    assert treeopt.muon_adamw(params).route("head") == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameters_get_no_state_and_never_change(backend):
    params = gpt2(backend)
    before = flat(params)
    frozen = ["transformer.wte.weight", "lm_head.weight"]
    multi = three_groups(frozen=F.is_embedding | F.glob("lm_head.*"))
    for k in range(3):
        multi.update(params, grads_for(params, backend, k))
    after = flat(params)
    for path in GPT2_PATHS:
        assert np.array_equal(after[path], before[path]) == (path in frozen), path
    for state in multi.state["states"]:
        assert not set(slot_paths(state)) & set(frozen)
    assert [multi.route(p) for p in frozen] == [None, None]
    plan = multi.plan()
    assert [r.path for r in plan.rows] == GPT2_PATHS
    rows = {r.path: r for r in plan.rows}
    assert (
        rows["transformer.wte.weight"].group,
        rows["transformer.wte.weight"].optimizer,
        rows["transformer.wte.weight"].reason,
    ) == (-1, "frozen", "frozen")
    assert [(rows[p].shape, rows[p].dtype, rows[p].size, rows[p].state_bytes) for p in frozen] == [
        ((16, 8), "float32", 128, 0),
        ((16, 8), "float32", 128, 0),
    ]
    assert plan.groups[2].parameters == 0  # sgd (the fallback) took only what is not frozen: nothing
