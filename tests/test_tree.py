"""Tests for ``treeopt.tree`` against ``mlx.utils`` (the reference, mlx 0.32.4).

The property tests generate nested trees (dicts, dict subclasses, lists, tuples and a
namedtuple; leaves are small ints, floats, ``None`` and strings) and require treeopt to
return exactly what ``mlx.utils`` returns, container types and key order included.

Where treeopt deliberately differs from MLX (``tree_merge`` key order, ``tree_unflatten``
duplicate keys and non-canonical integer keys) the tests assert treeopt's documented
behaviour, and never call MLX on inputs that make it recurse forever.
"""

from collections import OrderedDict, namedtuple

import pytest
from hypothesis import given, settings, strategies as st

mlx_utils = pytest.importorskip("mlx.utils")

from treeopt import tree as T  # noqa: E402

PROPERTY = settings(max_examples=150, deadline=None, database=None)

Pair = namedtuple("Pair", ["first", "second"])


class MyDict(dict):
    """A dict subclass: tree functions must return plain dicts in its place."""


MERGE_ERRORS = (
    "Trees contain elements at the same locations but no merge function was provided",
    "Cannot merge",
)

# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def assert_same(actual, expected, ordered=True, where="root"):
    """``actual == expected`` with the container types (and, if ``ordered``, the dict key
    order) checked at every level. ``==`` alone would accept a tuple for a namedtuple,
    an OrderedDict for a dict, ``1.0`` for ``1`` and any key order."""
    assert type(actual) is type(expected), f"{where}: {type(actual)!r} != {type(expected)!r}"
    if isinstance(expected, dict):
        if ordered:
            assert list(actual) == list(expected), f"{where}: key order {list(actual)} != {list(expected)}"
        else:
            assert set(actual) == set(expected), f"{where}: keys {set(actual)} != {set(expected)}"
        for k in expected:
            assert_same(actual[k], expected[k], ordered, f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, ordered, f"{where}.{i}")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def outcome(fn, *args, **kwargs):
    """``("ok", result)`` or ``("error", exception_type)`` of calling ``fn``."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - we compare whatever both libraries raise
        return "error", type(e)


def superset(tree):
    """A tree with at least ``tree``'s structure: each leaf becomes a sub-tree (so
    ``fn`` receives a container as its second argument) and dicts and lists get extra
    entries that ``tree_map`` must ignore."""
    if isinstance(tree, dict):
        out = {k: superset(v) for k, v in tree.items()}
        out["extra_key"] = "ignored"
        return out
    if hasattr(tree, "_fields"):
        return type(tree)(*(superset(v) for v in tree))
    if isinstance(tree, tuple):
        return tuple(superset(v) for v in tree) + ("ignored",)
    if isinstance(tree, list):
        return [superset(v) for v in tree] + ["ignored"]
    return [tree, "rest"]


def check_merge_order(result, a, b):
    """Where both ``a`` and ``b`` are non-empty dicts, the merged keys must be ``a``'s
    keys in order, then ``b``'s new keys in order; recurse into the merged children."""
    if isinstance(result, dict) and isinstance(a, dict) and isinstance(b, dict) and a and b:
        assert list(result) == list(a) + [k for k in b if k not in a]
        for k in result:
            check_merge_order(result[k], a.get(k), b.get(k))
    elif (
        isinstance(result, (list, tuple)) and isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and a and b
    ):
        for i, child in enumerate(result):
            check_merge_order(child, a[i] if i < len(a) else None, b[i] if i < len(b) else None)


def tag_merge(a, b):
    return ("merged", a, b)


# ---------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------

# Identifier-like keys: never digits-only, never containing "." (the documented contract).
keys = st.from_regex(r"[a-z_][a-z0-9_]{0,3}", fullmatch=True)

non_none_leaves = st.one_of(
    st.integers(-5, 5),
    st.floats(-10, 10, allow_nan=False),
    st.text(alphabet="abc.", max_size=3),
)
leaves = st.one_of(st.none(), non_none_leaves)


def containers(children):
    dicts = st.dictionaries(keys, children, max_size=3)
    return st.one_of(
        dicts,
        dicts.map(OrderedDict),
        dicts.map(MyDict),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.builds(Pair, children, children),
    )


trees = st.recursive(leaves, containers, max_leaves=12)
# tree_merge treats None and empty containers as absent, and two absent values as a
# conflict, so such a value under a key that only one tree has raises (in MLX too): keep
# them out of the values that must merge cleanly.
present_values = st.recursive(non_none_leaves, containers, max_leaves=12).filter(
    lambda t: not (isinstance(t, (dict, list, tuple)) and len(t) == 0)
)

IS_LEAF_CHOICES = [
    None,
    lambda x: isinstance(x, tuple),  # stops at tuples and namedtuples
    lambda x: isinstance(x, list) and len(x) <= 1,
    lambda x: x is None,
    lambda x: isinstance(x, dict) and "a" in x,
]
is_leaf_fns = st.sampled_from(IS_LEAF_CHOICES)


@st.composite
def disjoint_pairs(draw):
    """Two dicts that never put two leaves at the same place: a shared key whose
    sub-dicts have disjoint keys, a shared list padded with ``None`` on opposite
    sides, and keys found in only one of them."""
    a_keys = st.from_regex(r"a[a-z0-9_]{0,3}", fullmatch=True)
    b_keys = st.from_regex(r"b[a-z0-9_]{0,3}", fullmatch=True)
    a = draw(st.dictionaries(a_keys, present_values, max_size=3))
    b = draw(st.dictionaries(b_keys, present_values, max_size=3))
    shared_a = draw(st.dictionaries(a_keys, present_values, max_size=2))
    shared_b = draw(st.dictionaries(b_keys, present_values, max_size=2))
    x, y = draw(non_none_leaves), draw(non_none_leaves)
    # Shared keys first in b, so a set-ordered merge and treeopt's order differ visibly.
    a = {**a, "s": shared_a, "l": [x, None]}
    b = {"l": [None, y], "s": shared_b, **b}
    return dict(draw(st.permutations(list(a.items())))), b


# ---------------------------------------------------------------------------------------
# tree_map / tree_map_with_path
# ---------------------------------------------------------------------------------------


@PROPERTY
@given(trees, is_leaf_fns)
def test_tree_map_matches_mlx(tree, is_leaf):
    fn = lambda x: ("leaf", x)  # noqa: E731
    assert_same(T.tree_map(fn, tree, is_leaf=is_leaf), mlx_utils.tree_map(fn, tree, is_leaf=is_leaf))


@PROPERTY
@given(trees, is_leaf_fns)
def test_tree_map_with_second_tree_matches_mlx(tree, is_leaf):
    other = superset(tree)
    fn = lambda x, y: (x, y)  # noqa: E731
    assert_same(
        T.tree_map(fn, tree, other, is_leaf=is_leaf),
        mlx_utils.tree_map(fn, tree, other, is_leaf=is_leaf),
    )


def test_tree_map_rebuilds_container_types():
    tree = MyDict(a=OrderedDict(b=(1, Pair(2, [3]))))
    result = T.tree_map(lambda x: x + 10, tree)
    assert_same(result, {"a": {"b": (11, Pair(12, [13]))}})


def test_tree_map_rest_tree_missing_a_key_raises_like_mlx():
    with pytest.raises(KeyError):
        T.tree_map(lambda x, y: x, {"a": 1, "b": 2}, {"a": 1})
    with pytest.raises(IndexError):
        T.tree_map(lambda x, y: x, [1, 2], [1])


@PROPERTY
@given(trees, is_leaf_fns, st.sampled_from([None, "", "root", "m.x"]))
def test_tree_map_with_path_matches_mlx(tree, is_leaf, path):
    fn = lambda p, x: (p, x)  # noqa: E731
    assert_same(
        T.tree_map_with_path(fn, tree, is_leaf=is_leaf, path=path),
        mlx_utils.tree_map_with_path(fn, tree, is_leaf=is_leaf, path=path),
    )


@PROPERTY
@given(trees)
def test_tree_map_with_path_second_tree_matches_mlx(tree):
    other = superset(tree)
    fn = lambda p, x, y: (p, x, y)  # noqa: E731
    assert_same(T.tree_map_with_path(fn, tree, other), mlx_utils.tree_map_with_path(fn, tree, other))


def test_tree_map_with_path_concrete_paths():
    tree = {"layers": [{"w": 0}, Pair(1, 2)], "b": 3}
    assert T.tree_map_with_path(lambda p, x: p, tree) == {
        "layers": [{"w": "layers.0.w"}, Pair("layers.1.0", "layers.1.1")],
        "b": "b",
    }
    # A root leaf gets path None (the default), not "".
    assert T.tree_map_with_path(lambda p, x: p, 5) is None
    assert T.tree_map_with_path(lambda p, x: p, 5, path="top") == "top"
    assert T.tree_map_with_path(lambda p, x: p, {"a": 1}, path="top") == {"a": "top.a"}


# ---------------------------------------------------------------------------------------
# tree_flatten
# ---------------------------------------------------------------------------------------


@PROPERTY
@given(trees, st.sampled_from(["", ".model", "xmodel"]), is_leaf_fns)
def test_tree_flatten_matches_mlx(tree, prefix, is_leaf):
    assert_same(
        T.tree_flatten(tree, prefix=prefix, is_leaf=is_leaf),
        mlx_utils.tree_flatten(tree, prefix=prefix, is_leaf=is_leaf),
    )


@PROPERTY
@given(trees, st.sampled_from([list, dict]), is_leaf_fns)
def test_tree_flatten_into_destination_matches_mlx(tree, kind, is_leaf):
    # Pre-filled destinations: a list is extended, a dict updated; the same object is returned.
    ours = kind([("pre", 0)])
    theirs = kind([("pre", 0)])
    result = T.tree_flatten(tree, ".p", is_leaf, ours)
    assert result is ours
    mlx_utils.tree_flatten(tree, ".p", is_leaf, theirs)
    assert_same(ours, theirs)


def test_tree_flatten_concrete():
    tree = {"a": [1, {"b": (2, 3)}], "c": Pair(None, {}), "d": []}
    assert T.tree_flatten(tree) == [("a.0", 1), ("a.1.b.0", 2), ("a.1.b.1", 3), ("c.0", None)]
    assert T.tree_flatten(7) == [("", 7)]
    assert T.tree_flatten({}) == []


def test_tree_flatten_drops_first_prefix_character_like_mlx():
    tree = {"a": 1, "b": [2]}
    assert T.tree_flatten(tree, prefix="xmodel") == [("model.a", 1), ("model.b.0", 2)]
    assert T.tree_flatten(tree, prefix=".model") == [("model.a", 1), ("model.b.0", 2)]
    assert T.tree_flatten(5, prefix=".model") == [("model", 5)]
    assert T.tree_flatten(tree, prefix="xmodel") == mlx_utils.tree_flatten(tree, prefix="xmodel")


def test_tree_flatten_dict_destination_keeps_last_colliding_value():
    dest = {}
    T.tree_flatten({"a.b": 1, "a": {"b": 2}}, destination=dest)
    assert dest == {"a.b": 2}


@pytest.mark.parametrize("destination", [(), "abc", {1, 2}, 0])
def test_tree_flatten_invalid_destination_raises(destination):
    message = "Destination should be either a list or a dictionary or None"
    with pytest.raises(ValueError, match=message):
        T.tree_flatten({"a": 1}, destination=destination)
    with pytest.raises(ValueError, match=message):
        mlx_utils.tree_flatten({"a": 1}, destination=destination)


# ---------------------------------------------------------------------------------------
# tree_unflatten
# ---------------------------------------------------------------------------------------


@PROPERTY
@given(trees, st.sampled_from([list, dict]))
def test_tree_unflatten_of_flatten_matches_mlx(tree, kind):
    flat = kind(mlx_utils.tree_flatten(tree))
    assert_same(T.tree_unflatten(flat), mlx_utils.tree_unflatten(flat))


# Distinct dotted paths whose segments are identifiers or canonical integers: no
# duplicates and no empty segments, so MLX terminates and the two must agree.
segments = st.one_of(keys, st.sampled_from(["0", "1", "2", "10"]))
paths = st.lists(segments, min_size=1, max_size=3).map(".".join)


@PROPERTY
@given(st.lists(st.tuples(paths, leaves), max_size=6, unique_by=lambda kv: kv[0]))
def test_tree_unflatten_arbitrary_distinct_paths_matches_mlx(flat):
    assert_same(T.tree_unflatten(flat), mlx_utils.tree_unflatten(flat))


def test_tree_unflatten_round_trip():
    tree = {"layers": [{"w": 1, "b": 2}, {"w": 3}], "head": {"x": [4, 5]}}
    assert T.tree_unflatten(T.tree_flatten(tree)) == tree
    assert T.tree_unflatten(T.tree_flatten(tree, destination={})) == tree


def test_tree_unflatten_pads_list_gaps_with_empty_dicts_like_mlx():
    flat = [("2", "c"), ("0", "a")]
    assert_same(T.tree_unflatten(flat), ["a", {}, "c"])
    assert_same(T.tree_unflatten(flat), mlx_utils.tree_unflatten(flat))
    assert_same(T.tree_unflatten([("x.3", 1)]), {"x": [{}, {}, {}, 1]})


def test_tree_unflatten_empty_input_gives_empty_list_like_mlx():
    assert_same(T.tree_unflatten([]), [])
    assert_same(T.tree_unflatten({}), [])
    assert_same(mlx_utils.tree_unflatten([]), [])


def test_tree_unflatten_single_root_pair_returns_the_value():
    value = [1, {"a": 2}]
    assert T.tree_unflatten([("", value)]) is value
    assert T.tree_unflatten({"": 5}) == 5
    assert T.tree_unflatten([("", None)]) is None


def test_tree_unflatten_leaf_and_subtree_on_same_key_like_mlx():
    flat = [("a", 1), ("a.b", 2)]
    assert_same(T.tree_unflatten(flat), {"a": {"": 1, "b": 2}})
    assert_same(T.tree_unflatten(flat), mlx_utils.tree_unflatten(flat))


@pytest.mark.parametrize(
    "flat",
    [
        [("a.b", 1), ("a.b", 2)],
        [("x", 0), ("a.0", 1), ("a.0", 2)],
        [("w", 1), ("w", 1)],
    ],
)
def test_tree_unflatten_duplicate_key_raises(flat):
    # MLX recurses forever on these inputs: never call it here.
    duplicate = flat[-1][0]
    with pytest.raises(ValueError, match="duplicate") as info:
        T.tree_unflatten(flat)
    assert repr(duplicate) in str(info.value)


@pytest.mark.parametrize(
    "flat, expected",
    [
        ([("-1", "a"), ("1", "b")], {"-1": "a", "1": "b"}),  # MLX: ['a', 'b']
        ([(" 1", "a"), ("0", "b")], {" 1": "a", "0": "b"}),  # MLX: ['b', 'a']
        ([("01", "a")], {"01": "a"}),  # MLX: [{}, 'a']
        ([("01", "a"), ("1", "b")], {"01": "a", "1": "b"}),  # MLX agrees (#3877)
        ([("+1", "a")], {"+1": "a"}),  # MLX: [{}, 'a']
        ([("1_0", "a")], {"1_0": "a"}),  # MLX: int("1_0") == 10
        ([("m.-1", "a"), ("m.0", "b")], {"m": {"-1": "a", "0": "b"}}),
    ],
)
def test_tree_unflatten_only_canonical_integers_are_list_indices(flat, expected):
    assert_same(T.tree_unflatten(flat), expected)


def test_tree_unflatten_canonical_integers_give_lists():
    assert_same(T.tree_unflatten([("0", "a"), ("10", "b")]), ["a"] + [{}] * 9 + ["b"])
    assert_same(T.tree_unflatten([("1.0", "a"), ("0", "b")]), ["b", ["a"]])


# Keys that differ only by an empty segment, and digits that are not ASCII.


def test_tree_unflatten_distinct_keys_with_empty_segment_do_not_recurse_forever():
    with pytest.raises(ValueError):
        T.tree_unflatten([("a", 1), ("a.", 2)])


def test_tree_unflatten_superscript_digit_key_gives_a_dict():
    assert T.tree_unflatten([("²", 1)]) == {"²": 1}  # MLX: {'²': 1}


def test_tree_unflatten_non_ascii_digit_key_gives_a_dict():
    assert T.tree_unflatten([("١", 1)]) == {"١": 1}


# ---------------------------------------------------------------------------------------
# tree_reduce
# ---------------------------------------------------------------------------------------


@PROPERTY
@given(trees, is_leaf_fns)
def test_tree_reduce_without_initializer_matches_mlx(tree, is_leaf):
    fn = lambda acc, x: (acc, x)  # noqa: E731
    assert_same(
        T.tree_reduce(fn, tree, is_leaf=is_leaf),
        mlx_utils.tree_reduce(fn, tree, is_leaf=is_leaf),
    )


@PROPERTY
@given(trees, is_leaf_fns, st.sampled_from([(), 0, "init"]))
def test_tree_reduce_with_initializer_matches_mlx(tree, is_leaf, initializer):
    fn = lambda acc, x: (acc, x)  # noqa: E731
    assert_same(
        T.tree_reduce(fn, tree, initializer, is_leaf),
        mlx_utils.tree_reduce(fn, tree, initializer, is_leaf),
    )


def test_tree_reduce_concrete():
    add = lambda acc, x: acc + x  # noqa: E731
    assert T.tree_reduce(add, {"a": [1, 2], "b": (3, Pair(4, 5))}) == 15
    assert T.tree_reduce(add, {"a": [1, 2]}, 100) == 103
    assert T.tree_reduce(add, {}) is None
    assert T.tree_reduce(add, [], 7) == 7
    # Order is flatten order: dict values in insertion order, then list items.
    assert T.tree_reduce(add, {"b": ["x", "y"], "a": "z"}) == "xyz"
    # A None leaf looks like "no accumulator yet", as in MLX.
    assert T.tree_reduce(lambda acc, x: (acc, x), [None, 1, 2]) == (1, 2)


# ---------------------------------------------------------------------------------------
# tree_merge
# ---------------------------------------------------------------------------------------


@PROPERTY
@given(disjoint_pairs())
def test_tree_merge_disjoint_matches_mlx_up_to_key_order(pair):
    a, b = pair
    ours = T.tree_merge(a, b)
    assert_same(ours, mlx_utils.tree_merge(a, b), ordered=False)
    check_merge_order(ours, a, b)
    assert list(ours) == list(a) + [k for k in b if k not in a]
    assert ours["l"] == [a["l"][0], b["l"][1]]


@PROPERTY
@given(trees, trees, st.sampled_from([None, tag_merge]))
def test_tree_merge_matches_mlx_outcome(a, b, merge_fn):
    ours = outcome(T.tree_merge, a, b, merge_fn)
    theirs = outcome(mlx_utils.tree_merge, a, b, merge_fn)
    assert ours[0] == theirs[0]
    if ours[0] == "error":
        # Which of several errors comes first can depend on MLX's set order, so only the
        # type is compared here (ValueError, or TypeError when a namedtuple gets more
        # items than fields); the messages are checked in the concrete tests.
        assert ours[1] is theirs[1]
    else:
        assert_same(ours[1], theirs[1], ordered=False)
        check_merge_order(ours[1], a, b)


def test_tree_merge_key_order_is_a_then_new_b_keys():
    a = {"z": 1, "m": {"y": 1, "x": 2}, "k": [1]}
    b = {"b": 2, "m": {"w": 3, "x": None, "a": 4}, "a": 5}
    result = T.tree_merge(a, b)
    assert list(result) == ["z", "m", "k", "b", "a"]
    assert list(result["m"]) == ["y", "x", "w", "a"]
    assert result == {"z": 1, "m": {"y": 1, "x": 2, "w": 3, "a": 4}, "k": [1], "b": 2, "a": 5}


def test_tree_merge_conflicting_leaves_without_merge_fn_raise_like_mlx():
    message = "Trees contain elements at the same locations but no merge function was provided"
    for merge in (T.tree_merge, mlx_utils.tree_merge):
        with pytest.raises(ValueError, match=message):
            merge({"a": 1}, {"a": 2})
        with pytest.raises(ValueError, match=message):
            merge({"a": {"b": 1}}, {"a": [1]})  # non-empty dict against non-empty list


@pytest.mark.parametrize(
    "a, b, message",
    [
        ({}, [], "Cannot merge dict with list"),
        ([], (), "Cannot merge list with tuple"),
        ((), {}, "Cannot merge tuple with dict"),
    ],
)
def test_tree_merge_empty_containers_of_different_types_raise_like_mlx(a, b, message):
    for merge in (T.tree_merge, mlx_utils.tree_merge):
        with pytest.raises(ValueError, match=message):
            merge(a, b)
        with pytest.raises(ValueError, match=message):
            merge({"k": a}, {"k": b})


def test_tree_merge_uses_merge_fn_on_conflicts():
    result = T.tree_merge({"a": 1, "b": [2, 3]}, {"a": 10, "b": [20]}, lambda x, y: x + y)
    assert result == {"a": 11, "b": [22, 3]}
    # A leaf against a sub-tree also goes to merge_fn.
    assert T.tree_merge({"a": 1}, {"a": {"c": 2}}, tag_merge) == {"a": ("merged", 1, {"c": 2})}


def test_tree_merge_empty_and_none_count_as_absent():
    for merge in (T.tree_merge, mlx_utils.tree_merge):
        assert_same(merge({}, {}), {})
        assert_same(merge([], []), [])
        assert_same(merge({"a": {}}, {"a": {"b": 1}}), {"a": {"b": 1}})
        assert_same(merge(None, [1]), [1])
        assert_same(merge({"a": 1}, None), {"a": 1})


def test_tree_merge_absent_value_under_one_sided_key_raises_like_mlx():
    # A None or empty value counts as absent, the missing side too, and absent/absent is
    # a conflict: surprising, but it is what MLX does.
    for merge in (T.tree_merge, mlx_utils.tree_merge):
        for absent in (None, {}, []):
            with pytest.raises(ValueError, match="no merge function"):
                merge({"a": 1}, {"b": absent})
        result = merge({"a": 1}, {"b": None}, lambda x, y: "both absent")
        assert_same(result, {"a": 1, "b": "both absent"}, ordered=merge is T.tree_merge)


def test_tree_merge_list_padding_with_none_like_mlx():
    for merge in (T.tree_merge, mlx_utils.tree_merge):
        assert_same(merge([1], [None, 2]), [1, 2])
        assert_same(merge([1, 2, 3], [None]), [1, 2, 3])
        assert_same(merge((1,), [None, 2]), (1, 2))  # rebuilt with a's type
        assert_same(merge(Pair(1, None), (None, 2)), Pair(1, 2))
        # None against None (both sides absent) is still a conflict without merge_fn.
        with pytest.raises(ValueError, match="no merge function"):
            merge([1], [None, None])
        assert_same(merge([1], [None, None], tag_merge), [1, ("merged", None, None)])
