"""Routing on real architectures: each tensor of each model of the corpus
(``tests/routing_corpus.py``: transformers, mlx-lm, flax, equinox, nanoGPT-style GPTs) goes
where Keller Jordan's recipe sends it, with ``muon_adamw`` built as each framework's docs say,
one step taken, and the plan saying why. The default run checks a subset covering every
framework; ``-m slow`` runs all of it."""

import warnings

import pytest
import routing_corpus as corpus

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_FRAMEWORK = {"torch": "transformers", "mlx": "mlx_lm", "nnx": "flax", "linen": "flax", "equinox": "equinox"}


def _params(cases):
    return [pytest.param(case, id=case.name, marks=() if case.fast else pytest.mark.slow) for case in cases]


@pytest.mark.parametrize("case", _params(corpus.CASES))
def test_every_tensor_goes_where_the_recipe_sends_it(case):
    pytest.importorskip(_FRAMEWORK[case.framework])
    if case.framework == "mlx":
        pytest.importorskip("mlx.core")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = corpus.run(case)
    wrong = {path: f"expected {e.route} ({e.why}), routed to {got}" for path, (e, got) in result.misroutes().items()}
    assert not wrong, wrong
    assert result.steps == 1  # one step taken through the framework's own loop
    rows = {row.path: row for row in result.plan.rows}
    for path in result.expected:
        assert ": " in rows[path].reason, (path, rows[path].reason)  # the reason says what it is
    judged = {row.path for row in result.plan.judgement_calls()}
    for path, expected in result.expected.items():
        if expected.judgement is not None:
            assert path in judged, (path, rows[path].reason)


def test_the_tables_are_the_recipe_not_treeopt():
    """Spot checks of the expected tables, written by hand from the architectures."""
    cases = {case.name: case for case in corpus.CASES}
    pytest.importorskip("transformers")
    import torch  # noqa: F401

    model, _ = cases["gpt-oss"].build()
    table = corpus.expected_torch(cases["gpt-oss"], model)
    assert table["model.layers.0.mlp.experts.gate_up_proj_bias"].route == "adamw"  # a bias of shape (E, 2I)
    assert table["model.layers.0.mlp.experts.gate_up_proj"].route == "muon"  # one matrix per expert
    assert table["model.layers.0.self_attn.sinks"].route == "adamw"
    assert table["model.layers.0.mlp.router.weight"].judgement == "router"
    assert table["lm_head.weight"].route == "adamw" and table["model.embed_tokens.weight"].route == "adamw"
    model, _ = cases["whisper"].build()
    table = corpus.expected_torch(cases["whisper"], model)
    assert table["model.encoder.conv1.weight"].route == "adamw" and table["model.encoder.conv2.weight"].route == "muon"


def test_the_corpus_tells_the_recipe_from_the_ndim_heuristic():
    """On the default subset, the common ``ndim >= 2`` rule gets tensors wrong that treeopt
    gets right: the corpus can fail a router that only counts dimensions."""
    pytest.importorskip("transformers")
    case = next(c for c in corpus.CASES if c.name == "bert-question-answering")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = corpus.run(case)
    wrong = result.ndim_misroutes()
    assert "qa_outputs.weight" in wrong and "bert.embeddings.word_embeddings.weight" in wrong
    assert not result.misroutes()
