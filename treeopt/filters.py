"""Filters for ``MultiOptimizer``: predicates ``filter(path, weight) -> bool`` with readable
names, that compose with ``&``, ``|`` and ``~``.

    from treeopt.filters import glob, ndim, is_bias, is_norm, is_embedding, is_head

    hidden = ndim(min=2) & ~is_embedding & ~is_head
    no_decay = is_bias | is_norm
    blocks = glob("blocks.*.attn.*") | regex(r"^layers\\.\\d+\\.mlp\\.")

The name patterns fit the usual naming of PyTorch (``transformer.wte.weight``,
``layers.0.attention_norm.weight``, ``lm_head.weight``), flax (``params.Embed_0.embedding``,
``LayerNorm_0.scale``), equinox and MLX (``embed.weight``, ``norm.weight``). Names are
heuristics: check them on your model with ``multi.plan(params)``.

Module kinds. A framework integration knows more than names: the module that owns each
parameter. It declares what a parameter *is* (``"embedding"``, ``"head"``, ``"norm"``...) by
path, and the filters read it as well as the name::

    multi.declare_kinds({"tok.weight": "embedding", "out.weight": "head"})
    # or, for code that routes directly:
    with module_kinds({"tok.weight": "embedding"}):
        multi.update(params, grads)

``is_embedding``, ``is_head`` and ``is_norm`` accept a parameter whose declared kinds include
theirs *or* whose name matches (a declared kind adds, never removes), so Muon's routing guard
warns on an ``nn.Embedding`` named ``tok``. ``kind("conv")`` selects any declared kind.
``treeopt.torch`` declares the kinds of ``torch.nn`` modules; the JAX integration those of flax.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
import re
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from treeopt.types import Array

__all__ = [
    "Filter",
    "as_filter",
    "glob",
    "regex",
    "ndim",
    "shape",
    "is_bias",
    "is_norm",
    "is_embedding",
    "is_head",
    "name_says_head",
    "is_hidden_matrix",
    "is_input",
    "is_gain",
    "everything",
    "role",
    "Role",
    "routing_tree",
    "repeated_blocks",
    "JUDGEMENT_RULES",
    "kind",
    "kinds_of",
    "module_kinds",
    "normalise_kinds",
    "EMBEDDING",
    "HEAD",
    "NORM",
]

#: the kinds that treeopt's own filters read (see :func:`role`); integrations may declare others
EMBEDDING, HEAD, NORM = "embedding", "head", "norm"
#: a layer that reads the model's input (a stem) / writes its output (``head``'s synonym)
INPUT, OUTPUT = "input", "output"
#: a layer inside the network, placed there by structure (a trace): names cannot overrule it
HIDDEN = "hidden"
BIAS, GAIN, TABLE = "bias", "gain", "table"
#: module types, for the plan's reasons and the judgement calls
LINEAR, CONV, EXPERTS, DEPTHWISE, POINTWISE, ROUTER = "linear", "conv", "experts", "depthwise", "pointwise", "router"
#: a weight stored ``(in, out)`` where its framework stores ``(out, in)`` (Hugging Face's ``Conv1D``)
IN_OUT = "in_out"
_NO_KINDS: frozenset = frozenset()
_declared: contextvars.ContextVar = contextvars.ContextVar("treeopt_module_kinds", default=types.MappingProxyType({}))


def normalise_kinds(kinds: Mapping[str, str | Iterable[str]]) -> dict[str, frozenset[str]]:
    """``{path: kind or kinds}`` as ``{path: frozenset of kinds}``, checked."""
    result = {}
    for path, value in dict(kinds).items():
        values = (
            (value,)
            if isinstance(value, str)
            else tuple(value)
            if isinstance(value, (list, tuple, set, frozenset))
            else (None,)
        )
        if not isinstance(path, str) or not all(isinstance(v, str) for v in values):
            raise TypeError(f"module kinds map a dotted path to a kind name or names, got {path!r}: {value!r}")
        result[path] = frozenset(values)
    return result


def kinds_of(path: str) -> frozenset[str]:
    """The kinds declared for ``path`` where routing runs now (empty when none)."""
    return _declared.get().get(path, _NO_KINDS)


@contextlib.contextmanager
def module_kinds(kinds: Mapping[str, str | Iterable[str]]) -> Iterator[None]:
    """Within the block, the parameters at the paths of ``kinds`` (``{path: kind or kinds}``)
    have those kinds; nested blocks add to the outer ones."""
    kinds = normalise_kinds(kinds)
    outer = _declared.get()
    if outer:
        merged = dict(outer)
        for path, values in kinds.items():
            merged[path] = merged.get(path, _NO_KINDS) | values
        kinds = merged
    token = _declared.set(kinds)
    try:
        yield
    finally:
        _declared.reset(token)


class Filter:
    """A named predicate of ``(path, weight)``."""

    def __init__(
        self, fn: Callable[[str, Any], Any], name: str, op: str | None = None, explain: Callable | None = None
    ) -> None:
        #: the predicate, the name it prints as, and its operator (``&``, ``|``, ``~``, or ``None``)
        self.fn, self.name, self.op = fn, name, op
        #: ``explain(path, weight)``: why the filter decides as it does (a :class:`Role`), or None
        self.explain = explain

    def __call__(self, path: str, weight: Array) -> bool:
        return bool(self.fn(path, weight))

    def _operand(self, op):
        binary = self.op in ("&", "|")  # ~ binds tightest: never needs parentheses
        return f"({self.name})" if binary and (self.op != op or op == "~") else self.name

    def __and__(self, other: Callable[[str, Any], Any]) -> Filter:
        other = as_filter(other)
        return Filter(lambda p, w: self(p, w) and other(p, w), f"{self._operand('&')} & {other._operand('&')}", "&")

    def __or__(self, other: Callable[[str, Any], Any]) -> Filter:
        other = as_filter(other)
        return Filter(lambda p, w: self(p, w) or other(p, w), f"{self._operand('|')} | {other._operand('|')}", "|")

    def __rand__(self, other: Callable[[str, Any], Any]) -> Filter:
        return as_filter(other) & self

    def __ror__(self, other: Callable[[str, Any], Any]) -> Filter:
        return as_filter(other) | self

    def __invert__(self) -> Filter:
        return Filter(lambda p, w: not self(p, w), f"~{self._operand('~')}", "~")

    def __repr__(self) -> str:
        return self.name


def as_filter(fn: Callable[[str, Any], Any]) -> Filter:
    """``fn`` as a :class:`Filter` (a plain callable is named after its ``__name__``)."""
    if isinstance(fn, Filter):
        return fn
    if not callable(fn):
        raise TypeError(f"a filter must be callable, got {type(fn).__name__}")
    return Filter(fn, getattr(fn, "__name__", type(fn).__name__))


def glob(*patterns: str) -> Filter:
    """The path matches one of the shell-style ``patterns`` (``*`` also crosses dots):
    ``glob("blocks.*.weight")``."""
    return Filter(
        lambda p, w: any(fnmatch.fnmatchcase(p, pat) for pat in patterns), f"glob({', '.join(map(repr, patterns))})"
    )


def regex(pattern: str) -> Filter:
    """A regular expression found in the path (``re.search``)."""
    compiled = re.compile(pattern)
    return Filter(lambda p, w: compiled.search(p) is not None, f"regex({pattern!r})")


def _ndim(weight):
    return len(weight.shape)


def ndim(n: int | None = None, *, min: int | None = None, max: int | None = None) -> Filter:
    """The number of dimensions is ``n``, or within ``[min, max]``."""
    if n is not None:
        return Filter(lambda p, w: _ndim(w) == n, f"ndim({n})")
    low, high = -1 if min is None else min, float("inf") if max is None else max
    label = ", ".join(f"{k}={v}" for k, v in (("min", min), ("max", max)) if v is not None)
    return Filter(lambda p, w: low <= _ndim(w) <= high, f"ndim({label})")


def shape(*dims: int | None) -> Filter:
    """The shape is ``dims``, where ``None`` matches any size: ``shape(None, 768)``."""

    def matches(p, w):
        actual = tuple(w.shape)
        return len(actual) == len(dims) and all(d is None or d == a for d, a in zip(dims, actual))

    return Filter(matches, f"shape{dims}")


def _segments(path):
    return path.lower().split(".")


_NORM = re.compile(r"norm|^ln(_?\w*)?$|^bn\d*$")
_EMBED = re.compile(r"embed|^wte$|^wpe$|^tok_emb|^pos_emb")
_HEADS = {
    "lm_head",
    "head",
    "heads",
    "classifier",
    "cls",
    "score",
    "logits",
    "output_layer",
    "fc_out",
    "qa_outputs",
    "embed_out",
    "lm_loss",
    "proj_out",
}
_HEAD_SUFFIXES = ("_head", "_classifier", "_logits")
_INPUT = re.compile(r"^stem$|_stem$|^stem_|^patch_?embed|^first_conv$")
_TABLE = re.compile(r"relative_position|rel_pos|position_bias|^relative_attention_bias$|^rel_embeddings$")
#: learned tokens, and state-space models' decays (Mamba's ``A_log``: used elementwise)
_TOKEN = re.compile(r"_token$|_tokens$|^mask_emb$|^a_log$")
#: module names of an MoE layer's experts: a 2-D sibling of theirs is the layer's router
_EXPERTS = {"experts", "switch_mlp", "switch_glu"}
_POOLER = re.compile(r"pooler|^pre_classifier$")


def _is_bias(path, weight):
    last = _segments(path)[-1]
    if BIAS in kinds_of(path):
        return True
    return last == "bias" or last.endswith("_bias") or (last == "b" and _vector_shaped(weight))


def _modules(path):
    """The module names on the path (a lone name counts as its own module)."""
    segments = _segments(path)
    return segments[:-1] or segments


def _structural(path):
    """The layer's place in the network was learned from its structure (a trace of the forward
    pass, the order of its modules): names must not overrule it."""
    return HIDDEN in kinds_of(path)


def _is_norm(path, weight):
    return NORM in kinds_of(path) or any(_NORM.search(s) for s in _modules(path))


def _name_says_embedding(path):
    return any(_EMBED.search(s) for s in _segments(path))


def _is_embedding(path, weight):
    if EMBEDDING in kinds_of(path):
        return True
    return not _structural(path) and _name_says_embedding(path)


def name_says_head(path: str) -> bool:
    """The module names of ``path`` name an output layer (``head``, ``lm_head``, ``classifier``...)."""
    modules = _modules(path)
    return any(s in _HEADS or s.endswith(_HEAD_SUFFIXES) for s in modules) or _segments(path)[0] == "output"


def _is_head(path, weight):
    kinds = kinds_of(path)
    if HEAD in kinds or OUTPUT in kinds:
        return True
    if _structural(path):
        return False
    return name_says_head(path) or _tree_facts().is_vocabulary_head(path)


def _is_input(path, weight):
    if INPUT in kinds_of(path):
        return True
    return not _structural(path) and any(_INPUT.search(s) for s in _modules(path))


def _vector_shaped(weight):
    """At most one axis longer than 1: a bias, gain, learned token or scalar, whatever its
    number of axes (``(1, 1, C)`` as well as ``(C,)``)."""
    return sum(int(d) > 1 for d in weight.shape) <= 1


def _is_gain(path, weight):
    """A gain, learned token or scalar: vector-shaped, or declared used elementwise."""
    return _vector_shaped(weight) or GAIN in kinds_of(path) or any(_TOKEN.search(s) for s in _segments(path)[-1:])


def _is_table(path, weight):
    return TABLE in kinds_of(path) or any(_TABLE.search(s) for s in _segments(path))


# ---------------------------------------------------------------------- the tree being routed
_tree: contextvars.ContextVar = contextvars.ContextVar("treeopt_routing_tree", default=None)


class _TreeFacts:
    """What the whole tree tells about one of its parameters: which matrices are as wide as
    the vocabulary (the output layer), which sit beside an MoE layer's experts (routers) or an
    output layer (poolers). Computed once per tree, when first asked."""

    def __init__(self, shapes: Mapping[str, tuple]) -> None:
        self.shapes = {path: tuple(int(d) for d in shape) for path, shape in shapes.items()}
        self._heads: frozenset | None = None

    def is_vocabulary_head(self, path: str) -> bool:
        if self._heads is None:
            self._heads = self._vocabulary_heads()
        return path in self._heads

    def _vocabulary_heads(self):
        """The matrix whose output axis is the largest embedding table's rows: of several, the
        shallowest, then the last (a byte vocabulary as wide as a hidden layer is not taken)."""
        tables = {  # a layer declared linear or convolutional is no table, whatever its name
            path: shape[0]
            for path, shape in self.shapes.items()
            if len(shape) == 2
            and (EMBEDDING in kinds_of(path) or (_name_says_embedding(path) and not kinds_of(path) & {LINEAR, CONV}))
        }
        if not tables:
            return frozenset()
        vocabulary = max(tables.values())
        found = []
        repeated = repeated_blocks({p: s for p, s in self.shapes.items() if p not in tables})
        for path, shape in self.shapes.items():
            if len(shape) != 2 or EMBEDDING in kinds_of(path) or _name_says_embedding(path) or _structural(path):
                continue
            if repeated(path):  # a layer of a repeated block is no output layer, whatever its width
                continue
            last = path.rsplit(".", 1)[-1]
            outputs = shape[-1] if last == "kernel" else shape[0] if last == "weight" else None
            # an output layer maps fewer features than the vocabulary onto it (a hidden layer
            # of a toy model as wide as its vocabulary is no head)
            inputs = [d for d in shape if d != vocabulary] if outputs is None else [shape[0] + shape[-1] - outputs]
            if (outputs == vocabulary or (outputs is None and vocabulary in shape)) and max(
                inputs, default=0
            ) < vocabulary:
                found.append(path)
        if not found:
            return frozenset()
        shallowest = min(path.count(".") for path in found)
        return frozenset([[path for path in found if path.count(".") == shallowest][-1]])

    def siblings(self, path: str) -> list[str]:
        """Paths of the other parameters of the module that holds ``path``'s module."""
        modules = path.split(".")[:-1]
        if len(modules) < 2:
            return []
        parent = ".".join(modules[:-1]) + "."
        return [p for p in self.shapes if p.startswith(parent) and p != path]

    def beside_experts(self, path: str) -> bool:
        modules = path.split(".")[:-1]
        parent = ".".join(modules[:-1]) + "."
        return any(
            set(p[len(parent) :].split(".")[:1]) & _EXPERTS for p in self.shapes if p.startswith(parent)
        ) or ROUTER in kinds_of(path)

    def beside_output(self, path: str) -> bool:
        module = path.rsplit(".", 1)[0]
        return any(
            p.rsplit(".", 1)[0] != module and (HEAD in kinds_of(p) or OUTPUT in kinds_of(p) or name_says_head(p))
            for p in self.siblings(path)
            if len(self.shapes[p]) >= 2
        )


_NO_TREE = _TreeFacts({})


def repeated_blocks(shapes: Mapping[str, Iterable[int]]) -> Callable[[str], bool]:
    """``repeated(path)``: the parameter at ``path`` (one of ``shapes``, ``{path: shape}``)
    lies in a block the model holds several of: under a numbered element (``blocks.0``) whose
    container holds another number with a parameter at the same place and of the same shape
    (``blocks.1.mlp.weight`` beside ``blocks.0.mlp.weight``). The layers of a list (a
    ``Sequential``) differ in shape: each is a layer of its own. Frameworks' module kinds and
    the tree being routed read it: a layer of a repeated block is no output layer, however
    wide (a tied model whose MLP is as wide as its vocabulary has none)."""
    sizes = {path: tuple(int(d) for d in shape) for path, shape in shapes.items()}
    numbers: dict[tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]], set[str]] = {}
    for path, shape in sizes.items():
        segments = tuple(path.split("."))
        for i, segment in enumerate(segments[:-1]):
            if segment.isdigit():
                numbers.setdefault((segments[:i], segments[i + 1 :], shape), set()).add(segment)

    def repeated(path: str) -> bool:
        segments, shape = tuple(path.split(".")), sizes.get(path)
        return shape is not None and any(
            s.isdigit() and len(numbers.get((segments[:i], segments[i + 1 :], shape), ())) > 1
            for i, s in enumerate(segments[:-1])
        )

    return repeated


def _tree_facts() -> _TreeFacts:
    facts = _tree.get()
    return _NO_TREE if facts is None else facts


@contextlib.contextmanager
def routing_tree(shapes: Mapping[str, Iterable[int]]) -> Iterator[None]:
    """Within the block, filters may read the whole tree being routed (``{path: shape}``):
    :class:`MultiOptimizer` routes new parameters inside one, so that a vocabulary-sized
    output layer or an MoE router is recognised by its place in the model."""
    token = _tree.set(_TreeFacts({path: tuple(shape) for path, shape in shapes.items()}))
    try:
        yield
    finally:
        _tree.reset(token)


# ---------------------------------------------------------------------- what a parameter is
#: the rules of the layers the recipe does not settle (listed as judgement calls in plans)
JUDGEMENT_RULES = {
    "MoE router": "hidden matrix (experts x hidden): Muon",
    "pooler": "a square hidden matrix between the trunk and the head: Muon",
    "1x1 convolution": "a linear map of the channels: Muon",
    "depthwise convolution": "one filter per channel, not a linear map of the channels: AdamW",
    "relative-position table": "looked up, not multiplied: AdamW",
}


@dataclasses.dataclass(frozen=True)
class Role:
    """What a parameter is to Keller Jordan's recipe, and how that was told."""

    #: "hidden", "embedding", "input", "head", "norm", "bias", "gain", "table", "depthwise"
    name: str
    #: why, for the plan: "nn.Linear inside the network", "name 'lm_head'"...
    evidence: str
    #: the JUDGEMENT_RULES key when the layer is a judgement call
    judgement: str | None = None
    #: decided by the number of dimensions alone (no kind, name or structure)
    by_shape_only: bool = False

    @property
    def hidden(self) -> bool:
        return self.name == "hidden"

    def __str__(self) -> str:
        text = f"{self.name}: {self.evidence}"
        return (
            f"{text}; judgement call ({self.judgement}: {JUDGEMENT_RULES[self.judgement]})" if self.judgement else text
        )


def _told(kinds, names, by_kind, by_name):
    return by_kind if kinds & names else by_name


def role(path: str, weight: Array) -> Role:
    """What ``path`` is (see :class:`Role`): from its declared kinds first (module types, a
    trace of the forward pass), then its place in the tree being routed, its name, and last
    its shape. Muon is for ``hidden`` only."""
    kinds = kinds_of(path)
    leaf = _segments(path)[-1]
    if _is_norm(path, weight):
        return Role("norm", _told(kinds, {NORM}, "normalisation layer", "name of a normalisation layer"))
    if _is_bias(path, weight):
        return Role("bias", _told(kinds, {BIAS}, "declared a bias", f"name {leaf!r}"))
    if _vector_shaped(weight):
        return Role("gain", f"shape {tuple(weight.shape)}: at most one axis longer than 1")
    if _is_table(path, weight):  # an embedding layer too, when it holds relative positions (T5, DeBERTa)
        return Role("table", _told(kinds, {TABLE}, "a table", "name of a position table"), "relative-position table")
    if _is_embedding(path, weight):
        return Role("embedding", _told(kinds, {EMBEDDING}, "embedding table", "name of an embedding"))
    if _is_input(path, weight):
        return Role("input", _told(kinds, {INPUT}, "reads the model's input (a stem)", "name of a stem"))
    if _is_head(path, weight):
        how = "writes the model's output" if kinds & {HEAD, OUTPUT} else None
        if how is None:
            how = "name of an output layer" if name_says_head(path) else "as wide as the vocabulary"
        return Role("head", how)
    if GAIN in kinds or any(_TOKEN.search(s) for s in _segments(path)[-1:]):
        return Role("gain", _told(kinds, {GAIN}, "used elementwise, never as a matrix", "name of a learned token"))
    if DEPTHWISE in kinds:
        return Role("depthwise", "one filter per channel", "depthwise convolution")
    return _hidden(path, weight, kinds)


def _hidden(path, weight, kinds):
    facts = _tree_facts()
    judgement = None
    if POINTWISE in kinds:
        judgement = "1x1 convolution"
    elif len(weight.shape) == 2 and facts.beside_experts(path):
        judgement = "MoE router"
    elif any(_POOLER.search(s) for s in _modules(path)) or facts.beside_output(path):
        judgement = "pooler"
    if kinds & {HIDDEN, LINEAR, CONV, EXPERTS}:
        what = next(k for k in (EXPERTS, CONV, LINEAR, HIDDEN) if k in kinds)
        return Role("hidden", f"{what} layer inside the network", judgement)
    if judgement is not None:
        return Role("hidden", "its place in the model", judgement)
    if any(s.isdigit() for s in _segments(path)):
        return Role("hidden", "inside a repeated block")
    return Role("hidden", f"{len(weight.shape)}-D, and nothing else says what it is", by_shape_only=True)


def kind(*names: str) -> Filter:
    """The parameter's declared kinds (see :func:`module_kinds`) include one of ``names``:
    ``kind("conv")``."""
    wanted = frozenset(names)
    return Filter(lambda p, w: bool(kinds_of(p) & wanted), f"kind({', '.join(map(repr, names))})")


#: biases: declared ``"bias"``, or a last name of ``bias``, ``*_bias``, or ``b`` for a vector
#: (whatever their number of axes: GPT-OSS's expert biases are ``(experts, out)``)
is_bias = Filter(_is_bias, "is_bias")
#: parameters of normalisation layers: declared ``"norm"``, or a module named ``*norm*``,
#: ``ln*`` or ``bn*``
is_norm = Filter(_is_norm, "is_norm")
#: embeddings: declared ``"embedding"``, or a name containing ``embed``, or GPT-2's
#: ``wte``/``wpe`` (unless a trace placed the layer inside the network)
is_embedding = Filter(_is_embedding, "is_embedding")
#: output layers: declared ``"head"``/``"output"``, or a module named ``lm_head``, ``head``,
#: ``classifier``, ``qa_outputs``, ``*_head``..., or a top-level ``output``, or the matrix as
#: wide as the vocabulary in the tree being routed
is_head = Filter(_is_head, "is_head")
#: input layers (stems): declared ``"input"``, or a module named ``stem``, ``patch_embed``...
is_input = Filter(_is_input, "is_input")
#: gains, learned tokens and scalars: at most one axis longer than 1 (``(1, 1, C)`` too), or
#: declared ``"gain"`` (used elementwise), or named ``*_token``
is_gain = Filter(_is_gain, "is_gain")
#: the hidden matrices Muon is meant for: what :func:`role` calls ``hidden`` (two axes longer
#: than 1, and neither an embedding, stem, output layer, norm, bias, gain nor table)
is_hidden_matrix = Filter(lambda p, w: role(p, w).hidden, "is_hidden_matrix", explain=role)
#: every parameter
everything = Filter(lambda p, w: True, "everything")
