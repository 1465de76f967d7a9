"""Module kinds: what an integration says a parameter is (embedding, head, norm...), read by
the filters and by Muon's routing guard, whatever the parameter's name."""

import warnings

import numpy as np
import pytest

import treeopt as optim
from treeopt import filters as F
from treeopt.multi import RoutingWarning

W = np.ones((10, 4), np.float32)
PARAMS = {
    "tok": {"weight": W},
    "mid": {"weight": np.ones((4, 4), np.float32)},
    "out": {"weight": W},
    "scale": {"gamma": np.ones(4, np.float32)},
}


def test_declared_kinds_are_seen_by_the_filters_only_inside_the_block():
    assert not F.is_embedding("tok.weight", W) and not F.is_head("out.weight", W)
    with F.module_kinds({"tok.weight": "embedding", "out.weight": ["head"], "scale.gamma": F.NORM}):
        assert F.is_embedding("tok.weight", W) and not F.is_head("tok.weight", W)
        assert F.is_head("out.weight", W) and not F.is_embedding("out.weight", W)
        assert F.is_norm("scale.gamma", W[0])
        assert not F.is_hidden_matrix("tok.weight", W) and not F.is_hidden_matrix("out.weight", W)
        assert F.is_hidden_matrix("mid.weight", W)
    assert not F.is_embedding("tok.weight", W) and F.kinds_of("tok.weight") == frozenset()


def test_a_declared_kind_adds_to_the_name_heuristics_and_never_removes():
    with F.module_kinds({"lm_head.weight": "linear"}):
        assert F.is_head("lm_head.weight", W)
        assert F.kind("linear")("lm_head.weight", W) and not F.kind("conv")("lm_head.weight", W)


def test_nested_blocks_add_to_the_outer_kinds():
    with F.module_kinds({"a": "embedding"}):
        with F.module_kinds({"a": "head", "b": "conv"}):
            assert F.kinds_of("a") == {"embedding", "head"} and F.kinds_of("b") == {"conv"}
        assert F.kinds_of("a") == {"embedding"} and F.kinds_of("b") == frozenset()


def test_bad_kinds_are_refused_with_the_path():
    with pytest.raises(TypeError, match="'tok.weight'"):
        with F.module_kinds({"tok.weight": 3}):
            pass
    with pytest.raises(TypeError, match="kind name"):
        optim.MultiOptimizer([optim.AdamW(1e-3)]).declare_kinds({("tok", "weight"): "embedding"})


def test_a_multioptimizer_routes_by_the_kinds_it_was_told():
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [F.is_hidden_matrix], names=["muon", "adamw"])
    multi.declare_kinds({"tok.weight": "embedding", "out.weight": "head"})
    multi.init(PARAMS)
    assert [multi.route(p) for p in ("tok.weight", "mid.weight", "out.weight")] == [1, 0, 1]
    assert F.kinds_of("tok.weight") == frozenset()  # nothing leaks out of the step


def test_muon_guard_warns_on_a_declared_embedding_and_head():
    multi = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [F.ndim(2)])
    multi.declare_kinds({"tok.weight": "embedding", "out.weight": "head"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        multi.init(PARAMS)
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, RoutingWarning))
    assert len(messages) == 2
    assert "'out.weight'" in messages[0] and "output head" in messages[0]
    assert "'tok.weight'" in messages[1] and "embedding" in messages[1]
    notes = {row.path: row.notes for row in multi.plan().rows}
    assert notes["tok.weight"] and notes["out.weight"] and not notes["mid.weight"]


def test_nested_multioptimizers_see_the_outer_kinds():
    inner = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(1e-3)], [F.is_hidden_matrix])
    outer = optim.MultiOptimizer([inner, optim.SGD(0.1)], [F.ndim(2)])
    outer.declare_kinds({"tok.weight": "embedding"})
    outer.init(PARAMS)
    assert outer.route("tok.weight") == 0 and inner.route("tok.weight") == 1 and inner.route("mid.weight") == 0


# ---------------------------------------------------------------- the output layer and repeated blocks
# A layer of a block the model repeats is hidden, however wide: a tied language model (its
# output layer is the embedding) whose MLP is as wide as its vocabulary has no output layer
# among its matrices. The layers of a list (a Sequential) differ in shape: the last one, onto
# the vocabulary, is the output layer.
def test_repeated_blocks_are_blocks_holding_the_same_layers():
    repeated = F.repeated_blocks(
        {
            "blocks.0.up.weight": (16, 8),
            "blocks.0.down.weight": (8, 16),
            "blocks.1.up.weight": (16, 8),
            "blocks.1.down.weight": (8, 16),
            "layers.0.weight": (8, 8),
            "layers.1.weight": (16, 8),
            "solo.0.weight": (16, 8),
        }
    )
    assert repeated("blocks.1.up.weight") and repeated("blocks.0.down.weight")
    assert not repeated("layers.1.weight") and not repeated("layers.0.weight")  # a list of layers
    assert not repeated("solo.0.weight") and not repeated("unknown.0.weight")


def toy_lm(tied):
    """An embedding of 16 tokens, two blocks whose MLP is 16 wide, and (untied) an output layer."""
    ones = lambda *shape: np.ones(shape, np.float32)  # noqa: E731
    blocks = [{"up": {"weight": ones(16, 8)}, "down": {"weight": ones(8, 16)}} for _ in range(2)]
    tree = {"embed": {"weight": ones(16, 8)}, "blocks": blocks}
    return tree if tied else {**tree, "out": {"weight": ones(16, 8)}}


@pytest.mark.parametrize("tied", [True, False])
def test_a_layer_of_a_repeated_block_is_no_output_layer(tied):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoutingWarning)
        opt = optim.muon_adamw(toy_lm(tied))
    assert opt.names[opt.route("blocks.1.up.weight")] == "muon"
    assert tied or opt.names[opt.route("out.weight")] == "adamw"


def test_the_last_layer_of_a_list_of_layers_onto_the_vocabulary_is_the_output_layer():
    ones = lambda *shape: np.ones(shape, np.float32)  # noqa: E731
    tree = {"embed": {"weight": ones(16, 8)}, "layers": [{"weight": ones(8, 8)}, {"weight": ones(16, 8)}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoutingWarning)
        opt = optim.muon_adamw(tree)
    assert opt.names[opt.route("layers.1.weight")] == "adamw"
    assert opt.names[opt.route("layers.0.weight")] == "muon"


def test_frameworks_find_no_output_layer_in_a_repeated_block():
    """torch's, MLX's and flax's module kinds: a tied LM whose MLP maps onto as many features
    as its vocabulary has no head; the same LM untied has its own."""
    found = {}
    try:
        import torch

        import treeopt.torch

        class TorchLM(torch.nn.Module):
            def __init__(self, tied):
                super().__init__()
                self.embed = torch.nn.Embedding(16, 8)
                self.blocks = torch.nn.ModuleList(
                    torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)) for _ in range(2)
                )
                self.out = None if tied else torch.nn.Linear(8, 16)

        found["torch"] = lambda tied: treeopt.torch.module_kinds(TorchLM(tied))
    except ImportError:
        pass
    try:
        import mlx.nn as mnn

        import treeopt.mlx

        class MlxLM(mnn.Module):
            def __init__(self, tied):
                super().__init__()
                self.embed = mnn.Embedding(16, 8)
                self.blocks = [mnn.Sequential(mnn.Linear(8, 16), mnn.Linear(16, 8)) for _ in range(2)]
                if not tied:
                    self.out = mnn.Linear(8, 16)

        found["mlx"] = lambda tied: treeopt.mlx.module_kinds(MlxLM(tied))
    except ImportError:
        pass
    try:
        from flax import nnx

        import treeopt.jax

        class NnxLM(nnx.Module):
            def __init__(self, tied):
                rngs = nnx.Rngs(0)
                self.embed = nnx.Embed(16, 8, rngs=rngs)
                self.blocks = nnx.List(
                    [nnx.Sequential(nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 8, rngs=rngs)) for _ in range(2)]
                )
                if not tied:
                    self.out = nnx.Linear(8, 16, rngs=rngs)

        found["nnx"] = lambda tied: treeopt.jax.module_kinds(NnxLM(tied))
    except ImportError:
        pass
    if not found:
        pytest.skip("needs torch, MLX or flax")
    for framework, kinds_of_lm in found.items():
        heads = {
            tied: sorted(p for p, kinds in kinds_of_lm(tied).items() if "head" in kinds and not p.endswith("bias"))
            for tied in (True, False)
        }
        assert heads[True] == [], framework
        assert heads[False] in (["out.weight"], ["out.kernel"]), framework
