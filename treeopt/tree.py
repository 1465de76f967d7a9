"""Nested Python trees of arrays: map, flatten with dotted paths, unflatten, reduce, merge.

A *tree* is any nesting of ``dict``, ``list`` and ``tuple`` (subclasses and namedtuples
included); everything else is a *leaf*. A leaf's *path* joins the keys and indices on the
way to it with dots, e.g. ``layers.0.weight``.

The public functions follow ``mlx.utils`` (same arguments, same results), with two fixes:
``tree_merge`` keeps a deterministic key order (``a``'s keys, then ``b``'s new ones), and
``tree_unflatten`` rejects duplicate keys with a ``ValueError`` instead of recursing forever.
Only canonical non-negative integers (``"0"``, ``"12"``) become list indices.

This module imports no array library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import zip_longest
from typing import Any, overload

from treeopt.types import Tree

__all__ = [
    "tree_map",
    "tree_map_with_path",
    "tree_flatten",
    "tree_unflatten",
    "tree_reduce",
    "tree_merge",
]


def is_container(node: object) -> bool:
    return isinstance(node, (dict, list, tuple))


def rebuild(node: Tree, children: Iterable[Any]) -> Tree:
    """A container of ``node``'s kind holding ``children`` (values in order; for a dict,
    ``(key, value)`` pairs). Dict subclasses come back as plain dicts, as in ``mlx.utils``."""
    if isinstance(node, dict):
        return dict(children)
    if hasattr(node, "_fields"):  # namedtuple: positional constructor
        return type(node)(*children)
    return type(node)(children)


def items(node: Tree) -> Iterable[tuple[Any, Tree]]:
    """``(key, child)`` pairs of a container, in order."""
    return node.items() if isinstance(node, dict) else enumerate(node)


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree, is_leaf: Callable[[Any], bool] | None = None) -> Tree:
    """Apply ``fn`` to every leaf of ``tree`` and return a tree of the results.

    ``rest`` are trees with at least ``tree``'s structure; their matching nodes are passed
    to ``fn`` as extra arguments.

    >>> tree_map(lambda x: x * 2, {"a": [1, 2], "b": (3,)})
    {'a': [2, 4], 'b': (6,)}
    """
    if (is_leaf is not None and is_leaf(tree)) or not is_container(tree):
        return fn(tree, *rest)

    def child_result(k, child):
        return tree_map(fn, child, *(r[k] for r in rest), is_leaf=is_leaf)

    if isinstance(tree, dict):
        return rebuild(tree, ((k, child_result(k, c)) for k, c in tree.items()))
    return rebuild(tree, (child_result(i, c) for i, c in enumerate(tree)))


def tree_map_with_path(
    fn: Callable[..., Any],
    tree: Tree,
    *rest: Tree,
    is_leaf: Callable[[Any], bool] | None = None,
    path: str | None = None,
) -> Tree:
    """Like :func:`tree_map`, but ``fn(path, leaf, *rest_leaves)`` also gets the leaf's
    dotted path. A root leaf gets ``path`` (``None`` by default).

    >>> tree_map_with_path(lambda p, x: p, {"a": [1, 2]})
    {'a': ['a.0', 'a.1']}
    """
    if (is_leaf is not None and is_leaf(tree)) or not is_container(tree):
        return fn(path, tree, *rest)
    prefix = f"{path}." if path else ""

    def child_result(k, child):
        return tree_map_with_path(fn, child, *(r[k] for r in rest), is_leaf=is_leaf, path=f"{prefix}{k}")

    if isinstance(tree, dict):
        return rebuild(tree, ((k, child_result(k, c)) for k, c in tree.items()))
    return rebuild(tree, (child_result(i, c) for i, c in enumerate(tree)))


@overload
def tree_flatten(
    tree: Tree, prefix: str = "", is_leaf: Callable[[Any], bool] | None = None, destination: list | None = None
) -> list[tuple[str, Any]]: ...
@overload
def tree_flatten(
    tree: Tree, prefix: str = "", is_leaf: Callable[[Any], bool] | None = None, *, destination: dict
) -> dict[str, Any]: ...
def tree_flatten(
    tree: Tree, prefix: str = "", is_leaf: Callable[[Any], bool] | None = None, destination: list | dict | None = None
) -> list[tuple[str, Any]] | dict[str, Any]:
    """The ``(path, leaf)`` pairs of ``tree``, depth first, in insertion order.

    As in ``mlx.utils`` the first character of every key is dropped, so a prefix is
    written with a leading dot: ``tree_flatten(t, prefix=".model")`` gives ``model.a``.
    ``destination`` may be a list (extended) or a dict (updated).

    >>> tree_flatten({"a": [1, {"b": 2}]})
    [('a.0', 1), ('a.1.b', 2)]
    """
    if destination is None:
        destination = []
    if isinstance(destination, list):
        add = destination.append
    elif isinstance(destination, dict):

        def add(pair: tuple[str, Any]) -> None:
            destination[pair[0]] = pair[1]
    else:
        raise ValueError("Destination should be either a list or a dictionary or None")

    def walk(node: Tree, key: str) -> None:
        if (is_leaf is not None and is_leaf(node)) or not is_container(node):
            add((key[1:], node))
            return
        for k, child in items(node):
            walk(child, f"{key}.{k}")

    walk(tree, prefix)
    return destination


def _list_index(key: str) -> int | None:
    """``int(key)`` when ``key`` is a canonical non-negative integer, else ``None``."""
    if key.isascii() and key.isdigit() and (key == "0" or not key.startswith("0")):
        return int(key)
    return None


def tree_unflatten(tree: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> Tree:
    """Rebuild a tree from ``(path, leaf)`` pairs (a list) or a ``{path: leaf}`` dict.

    A level whose keys are all distinct canonical integers becomes a list (gaps padded with
    ``{}``); any other level becomes a dict in first-seen order. A single ``""`` key is the
    root leaf. Duplicate paths raise ``ValueError``.

    >>> tree_unflatten([("a.0", 1), ("a.1.b", 2)])
    {'a': [1, {'b': 2}]}
    """
    pairs = list(tree.items()) if isinstance(tree, dict) else list(tree)
    return _unflatten(pairs, "")


def _unflatten(pairs, prefix):
    if len(pairs) == 1 and pairs[0][0] == "":
        return pairs[0][1]
    seen = set()  # checked at every level: "a" and "a." collide one level down
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"tree_unflatten: duplicate key {prefix + key!r}")
        seen.add(key)
    children: dict[str, list[tuple[str, Any]]] = {}
    for key, value in pairs:
        head, _, tail = key.partition(".")
        children.setdefault(head, []).append((tail, value))
    indices = {_list_index(k): k for k in children}
    if children and None not in indices and len(indices) == len(children):
        result: list[Any] = []
        for i in sorted(i for i in indices if i is not None):  # all of them (checked above)
            result.extend({} for _ in range(i - len(result)))
            result.append(_unflatten(children[indices[i]], f"{prefix}{indices[i]}."))
        return result
    if not children:
        return []
    return {k: _unflatten(v, f"{prefix}{k}.") for k, v in children.items()}


def tree_reduce(
    fn: Callable[[Any, Any], Any], tree: Tree, initializer: Any = None, is_leaf: Callable[[Any], bool] | None = None
) -> Any:
    """Fold ``fn(accumulator, leaf)`` over the leaves in flatten order. Without an
    ``initializer`` the first leaf seeds the fold.

    >>> tree_reduce(lambda acc, x: acc + x, {"a": [1, 2], "b": 3}, 0)
    6
    """
    accumulator = initializer
    for _, leaf in tree_flatten(tree, is_leaf=is_leaf):
        accumulator = leaf if accumulator is None else fn(accumulator, leaf)
    return accumulator


def tree_merge(tree_a: Tree, tree_b: Tree, merge_fn: Callable[[Any, Any], Any] | None = None) -> Tree:
    """Merge two trees into one, like a deep ``dict.update``.

    Empty containers and ``None`` count as absent. Two leaves at the same place are
    combined with ``merge_fn(a, b)``; without one that is a ``ValueError``. Dict keys come
    out in a deterministic order: ``tree_a``'s, then those only in ``tree_b``.

    >>> tree_merge({"a": 1, "c": [3]}, {"b": [2], "c": [None, 4]})
    {'a': 1, 'c': [3, 4], 'b': [2]}
    """
    empty_a = is_container(tree_a) and len(tree_a) == 0
    empty_b = is_container(tree_b) and len(tree_b) == 0
    if empty_a and empty_b:
        if type(tree_a) is not type(tree_b):
            raise ValueError(f"Cannot merge {type(tree_a).__name__} with {type(tree_b).__name__}")
        return type(tree_a)()
    if empty_a:
        tree_a = None
    if empty_b:
        tree_b = None
    if tree_a is None:
        if tree_b is not None:
            return tree_b
    elif tree_b is None:
        return tree_a
    if isinstance(tree_a, (list, tuple)) and isinstance(tree_b, (list, tuple)):
        return rebuild(tree_a, (tree_merge(a, b, merge_fn) for a, b in zip_longest(tree_a, tree_b)))
    if isinstance(tree_a, dict) and isinstance(tree_b, dict):
        keys = list(tree_a) + [k for k in tree_b if k not in tree_a]
        return {k: tree_merge(tree_a.get(k), tree_b.get(k), merge_fn) for k in keys}
    if merge_fn is None:
        raise ValueError("Trees contain elements at the same locations but no merge function was provided")
    return merge_fn(tree_a, tree_b)
