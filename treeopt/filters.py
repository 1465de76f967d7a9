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
    "is_hidden_matrix",
    "everything",
    "kind",
    "kinds_of",
    "module_kinds",
    "normalise_kinds",
    "EMBEDDING",
    "HEAD",
    "NORM",
]

#: the kinds that treeopt's own filters read; integrations may declare others ("conv", "linear")
EMBEDDING, HEAD, NORM = "embedding", "head", "norm"
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

    def __init__(self, fn: Callable[[str, Any], Any], name: str, op: str | None = None) -> None:
        #: the predicate, the name it prints as, and its operator (``&``, ``|``, ``~``, or ``None``)
        self.fn, self.name, self.op = fn, name, op

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
_HEADS = {"lm_head", "head", "heads", "classifier", "cls", "score", "logits", "output_layer", "fc_out"}


def _is_bias(path, weight):
    last = _segments(path)[-1]
    return last == "bias" or last.endswith("_bias") or (last == "b" and _ndim(weight) <= 1)


def _modules(path):
    """The module names on the path (a lone name counts as its own module)."""
    segments = _segments(path)
    return segments[:-1] or segments


def _is_norm(path, weight):
    return NORM in kinds_of(path) or any(_NORM.search(s) for s in _modules(path))


def _is_embedding(path, weight):
    return EMBEDDING in kinds_of(path) or any(_EMBED.search(s) for s in _segments(path))


def _is_head(path, weight):
    return HEAD in kinds_of(path) or any(s in _HEADS for s in _modules(path)) or _segments(path)[0] == "output"


def kind(*names: str) -> Filter:
    """The parameter's declared kinds (see :func:`module_kinds`) include one of ``names``:
    ``kind("conv")``."""
    wanted = frozenset(names)
    return Filter(lambda p, w: bool(kinds_of(p) & wanted), f"kind({', '.join(map(repr, names))})")


#: biases: a last name of ``bias``, ``*_bias``, or ``b`` for a vector
is_bias = Filter(_is_bias, "is_bias")
#: parameters of normalisation layers: declared ``"norm"``, or a module named ``*norm*``,
#: ``ln*`` or ``bn*``
is_norm = Filter(_is_norm, "is_norm")
#: embeddings: declared ``"embedding"``, or a name containing ``embed``, or GPT-2's
#: ``wte``/``wpe``
is_embedding = Filter(_is_embedding, "is_embedding")
#: output heads: declared ``"head"``, or a module named ``lm_head``, ``head``,
#: ``classifier``, ``score``..., or a top-level ``output``
is_head = Filter(_is_head, "is_head")
#: the hidden matrices Muon is meant for: two or more dimensions, neither embedding nor head
is_hidden_matrix = Filter(
    lambda p, w: _ndim(w) >= 2 and not _is_embedding(p, w) and not _is_head(p, w), "is_hidden_matrix"
)
#: every parameter
everything = Filter(lambda p, w: True, "everything")
