"""The checkpoint loader against crafted files: random mutations of a valid checkpoint, most of
them written back with a *valid* checksum (as a hand-made or buggy file would be), loaded into
an optimizer that has state of its own.

Every load must end one of two ways:

- a ``CheckpointError``, and the optimizer and the parameters bit-identical to before;
- success, and the optimizer then holds exactly what the file says (every stored array, the
  step, the whole-model counters and the routing), and its next step runs.

Any other exception, or a success whose state differs from the file, is a failure.

The default run is bounded (``TREEOPT_FUZZ_EXAMPLES`` examples, 150 by default); set the
variable higher, e.g. ``TREEOPT_FUZZ_EXAMPLES=5000``, for a longer search.
"""

import json
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import treeopt as optim
from treeopt import checkpoint
from treeopt.checkpoint import files
from treeopt.tree import tree_flatten

pytest.importorskip("safetensors")
pytestmark = pytest.mark.filterwarnings("ignore::treeopt.RoutingWarning")

EXAMPLES = int(os.environ.get("TREEOPT_FUZZ_EXAMPLES", "150"))


# ------------------------------------------------------------------------------ the subject
def parameters():
    rng = np.random.default_rng(0)
    return {
        "embed": rng.standard_normal((6, 4)).astype(np.float32),
        "layers": [
            {"w": rng.standard_normal((4, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
            for _ in range(2)
        ],
        "head": rng.standard_normal((3, 4)).astype(np.float32),
    }


def gradients(step):
    rng = np.random.default_rng(100 + step)
    return {
        "embed": rng.standard_normal((6, 4)).astype(np.float32),
        "layers": [
            {"w": rng.standard_normal((4, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
            for _ in range(2)
        ],
        "head": rng.standard_normal((3, 4)).astype(np.float32),
    }


def optimizer():
    """Three groups, a scheduled learning rate, gradient accumulation and the non-finite guard."""
    return optim.MultiOptimizer(
        [optim.Adam(1e-2), optim.AdamW(optim.cosine_decay(1e-2, 20)), optim.SGD(0.1, momentum=0.9)],
        [lambda path, w: path.endswith(".w"), lambda path, w: path.startswith("embed")],
        accumulate=2,
        skip_nonfinite=True,
    )


def trained():
    """An optimizer with every kind of saved content: slots, scalars, accumulation buffers,
    a frozen parameter, a parameter re-routed with its slots carried (not taken up yet)."""
    opt, params = optimizer(), parameters()
    for step in range(5):
        opt.update(params, gradients(step))
    opt.freeze("head")
    opt.reroute("layers.0.w", "AdamW", state="carry")
    return opt, params


@pytest.fixture(scope="module")
def valid():
    opt, _ = trained()
    tensors, metadata = checkpoint.to_flat(opt)
    tensors = {k: files.as_numpy(v).copy() for k, v in tensors.items()}
    assert any(k.startswith("#carried/") for k in tensors) and any(k.startswith("#accumulated/") for k in tensors)
    assert metadata["routing"]
    return tensors, metadata


def target():
    """The optimizer a file is loaded into: it has taken steps of its own."""
    opt, params = optimizer(), parameters()
    for step in range(3):
        opt.update(params, gradients(50 + step))
    return opt, params


def fingerprint(opt, params):
    """Everything a load may change, as bytes: state, routing, bookkeeping, parameters."""

    def arrays(tree):
        return {
            k: (type(v).__name__, str(getattr(v, "dtype", None)), np.shape(v), files.as_numpy(v).tobytes())
            for k, v in tree_flatten(tree)
        }

    routing = (opt.routes(), list(opt.changes))
    bookkeeping = [
        (dict(o.store.parameters), {k: arrays(v) for k, v in o.store.carried.items()}, o.store.checked)
        for _, _, o in opt.groups()
    ]
    return arrays(opt.state), routing, bookkeeping, arrays(params)


# ------------------------------------------------------------------------------ mutations
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
dtypes = st.sampled_from(["float64", "float32", "float16", "int64", "int32", "uint64", "uint8", "bool"])


def nodes(tree, found=None):
    """Every (container, key) of a JSON tree."""
    found = [] if found is None else found
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.append((tree, key))
            nodes(value, found)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found.append((tree, i))
            nodes(value, found)
    return found


def mutate_metadata(data, metadata):
    places = nodes(metadata)
    container, key = data.draw(st.sampled_from(places))
    action = data.draw(st.sampled_from(["replace", "plausible", "delete", "add"]))
    if action == "replace":
        container[key] = data.draw(json_values)
    elif action == "plausible":  # a value of the right kind from elsewhere in the file
        container[key] = json.loads(json.dumps(data.draw(st.sampled_from([c[k] for c, k in places]))))
    elif action == "delete":
        del container[key]
    elif isinstance(container, dict):
        container[data.draw(st.text(max_size=8))] = data.draw(json_values)
    else:
        container.insert(key, data.draw(json_values))


def mutate_tensors(data, tensors):
    keys = sorted(tensors)
    key = data.draw(st.sampled_from(keys))
    array = tensors[key]
    action = data.draw(st.sampled_from(["shape", "dtype", "values", "drop", "rename", "add"]))
    if action == "shape":
        options = [
            array.reshape(-1),
            array.reshape((1,) + array.shape),
            np.stack([array, array]),
            np.zeros((), array.dtype),
            np.zeros((0,), array.dtype),
        ]
        if array.ndim:
            options.append(array[..., :1])
        tensors[key] = data.draw(st.sampled_from(options))
    elif action == "dtype":
        with np.errstate(invalid="ignore"):
            tensors[key] = array.astype(data.draw(dtypes))
    elif action == "values":
        fill = data.draw(st.sampled_from([np.nan, np.inf, -1.0, 1e30, 0.0, 3.0]))
        tensors[key] = np.full_like(array, fill) if array.dtype.kind == "f" else -1 - array.astype(np.int64)
    elif action == "drop":
        del tensors[key]
    else:
        prefix = data.draw(
            st.sampled_from(
                ["", "@", "#", "#accumulated/", "#carried/", "@AdamW/", "layers.1.b/", "#grad_norm", "head/"]
            )
        )
        suffix = data.draw(st.sampled_from(["", "m", "v", "step", "learning_rate", "x", "layers.0.w/v", "embed"]))
        value = array if action == "rename" else np.ones(data.draw(st.sampled_from([(), (4,), (4, 4)])), np.float32)
        if action == "rename":
            del tensors[key]
        tensors[prefix + suffix] = value


def write_crafted(path, tensors, metadata):
    """Write with a checksum that matches the crafted content."""
    files.write(path, tensors, metadata)


# ------------------------------------------------------------------------------ the oracle
def check_load(path):
    """Load ``path`` into a trained optimizer; returns "refused" or "loaded" (or fails)."""
    opt, params = target()
    before = fingerprint(opt, params)
    try:
        report = checkpoint.load(opt, path, params=params)
    except checkpoint.CheckpointError:
        assert fingerprint(opt, params) == before, "a refused checkpoint changed the optimizer"
        return "refused"
    # loaded: the optimizer holds exactly what the file says
    stored, metadata = checkpoint.read(path)
    assert report.ok
    exported, exported_meta = checkpoint.to_flat(opt)
    exported = {k: files.as_numpy(v) for k, v in exported.items()}
    for key in stored.keys():
        value = stored[key]
        if key.startswith("#carried/") and key not in exported:  # taken up by the slots at init
            path_, _, slot = key[len("#carried/") :].rpartition("/")
            key = f"{path_}/{slot}"
        assert key in exported, f"{key} was in the file and is not in the optimizer"
        got = exported[key]
        if key.endswith("/step") and key.startswith("@"):  # a step count: its value (the library picks the dtype)
            assert int(got) == int(value), f"{key}: step {int(got)} != {int(value)}"
            continue
        assert (got.dtype, got.shape) == (value.dtype, value.shape), (
            f"{key}: {got.dtype}{got.shape} != {value.dtype}{value.shape}"
        )
        assert got.tobytes() == value.tobytes(), f"{key}: loaded values differ from the file"
    assert exported_meta["step"] == metadata.get("step", exported_meta["step"])
    assert exported_meta["whole_model"] == metadata.get("whole_model", {})
    canonical = lambda nodes: sorted(json.dumps(n, sort_keys=True) for n in nodes)  # noqa: E731
    assert canonical(exported_meta.get("routing", [])) == canonical(metadata.get("routing", []))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.update(params, gradients(99))  # the loaded state is usable
    return "loaded"


OUTCOMES = {"refused": 0, "loaded": 0}


@pytest.fixture(scope="module", autouse=True)
def outcomes():
    """Prints how the crafted files ended (``pytest -s`` shows it; docs/reliability.md quotes it)."""
    yield
    print(
        f"\ncrafted checkpoints: {OUTCOMES['refused']} refused with CheckpointError and nothing changed, "
        f"{OUTCOMES['loaded']} loaded exactly as written; no other outcome"
    )


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_crafted_checkpoints_with_valid_checksums_never_load_wrong(tmp_path_factory, valid, data):
    tensors = {k: v.copy() for k, v in valid[0].items()}
    metadata = json.loads(json.dumps(valid[1]))
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            mutate_metadata(data, metadata)
        else:
            mutate_tensors(data, tensors)
    path = tmp_path_factory.mktemp("fuzz") / "crafted.safetensors"
    write_crafted(path, tensors, metadata)
    OUTCOMES[check_load(path)] += 1


@settings(
    max_examples=max(20, EXAMPLES // 5),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_damaged_bytes_are_refused_and_change_nothing(tmp_path_factory, valid, data):
    folder = tmp_path_factory.mktemp("bytes")
    path = folder / "good.safetensors"
    files.write(path, *valid)
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
        at = data.draw(st.integers(0, len(raw) - 1))
        if action == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "truncate":
            del raw[at:]
            if not raw:
                raw = bytearray(b"\0")
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    path.write_bytes(bytes(raw))
    check_load(path)


def test_a_deeply_nested_metadata_header_is_a_checkpoint_error(tmp_path, valid):
    from safetensors.numpy import save_file

    depth = 100_000
    save_file(valid[0], tmp_path / "deep.safetensors", metadata={files.METADATA_KEY: "[" * depth + "]" * depth})
    opt, params = target()
    before = fingerprint(opt, params)
    with pytest.raises(checkpoint.CheckpointError, match="nested too deeply"):
        checkpoint.load(opt, tmp_path / "deep.safetensors", params=params)
    assert fingerprint(opt, params) == before


def test_the_unmutated_checkpoint_loads_with_its_routing(tmp_path, valid):
    """The oracle's other side: the valid file loads, routing and carried slots included."""
    path = tmp_path / "valid.safetensors"
    files.write(path, *valid)
    assert check_load(path) == "loaded"
    opt, params = target()
    checkpoint.load(opt, path, params=params)
    assert opt.route("layers.0.w") == 1 and opt.route("head") is None
    assert any("rerouted layers.0.w" in change for change in opt.changes)
