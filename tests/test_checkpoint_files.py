"""treeopt.checkpoint.files: the file is safetensors keyed by path with metadata, never
unpickled, written atomically and checksummed (truncations, bit flips, killed writers)."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import treeopt as optim
from arrays import as_float64
from checkpoint_helpers import (
    HERE,
    assert_bit_identical,
    is_layer_matrix,
    model_values,
    muon_adamw,
    numpy_of,
    on,
    slots_by_path,
    state_by_key,
    train,
)
from treeopt import checkpoint
from treeopt.tree import tree_flatten, tree_map

pytestmark = pytest.mark.filterwarnings("ignore::treeopt.RoutingWarning")


# ------------------------------------------------------------------------------ 1. the format
def test_file_is_safetensors_with_keys_by_path_and_metadata(tmp_path):
    values = model_values()
    params = on(values, "numpy")
    opt = optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(3e-3, betas=(0.9, lambda step: 0.99))],
        [is_layer_matrix],
        names=["hidden", "rest"],
    )
    train(opt, params, "numpy", 3)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(opt, path)

    from safetensors import safe_open

    with safe_open(str(path), "numpy") as handle:
        keys = set(handle.keys())
        tensors = {k: handle.get_tensor(k) for k in keys}
        metadata = json.loads(handle.metadata()["treeopt"])
    expected = {"@hidden/step", "@hidden/learning_rate", "@rest/step", "@rest/learning_rate", "@rest/betas[1]"}
    for i in range(2):
        expected |= {
            f"layers.{i}.attn.weight/v",
            f"layers.{i}.mlp.weight/v",
            f"layers.{i}.attn.bias/m",
            f"layers.{i}.attn.bias/v",
        }
    for name in ("embed.weight", "norm.scale", "head.weight"):
        expected |= {f"{name}/m", f"{name}/v"}
    assert keys == expected
    np.testing.assert_array_equal(
        tensors["layers.0.attn.weight/v"], opt.optimizers[0].state["layers"][0]["attn"]["weight"]["v"]
    )
    np.testing.assert_array_equal(tensors["head.weight/m"], opt.optimizers[1].state["head"]["weight"]["m"])
    assert int(tensors["@hidden/step"]) == 3 and int(tensors["@rest/step"]) == 3
    assert tensors["@hidden/step"].shape == () and tensors["@rest/learning_rate"].shape == ()  # 0-d, as in the state
    assert tensors["@hidden/learning_rate"] == np.float32(0.02)
    assert tensors["@rest/betas[1]"] == np.float32(0.99)

    assert metadata["format"] == "treeopt-checkpoint"
    assert metadata["format_version"] == 1
    assert metadata["treeopt_version"] == optim.__version__
    assert metadata["step"] == 3
    hidden, rest = metadata["optimizers"]
    assert (hidden["name"], hidden["position"], hidden["type"]) == ("hidden", [0], "Muon")
    assert (rest["name"], rest["position"], rest["type"]) == ("rest", [1], "AdamW")
    assert hidden["hyperparameters"] == {
        "momentum": 0.95,
        "weight_decay": 0.01,
        "decoupled_weight_decay": False,
        "nesterov": True,
        "ns_steps": 5,
        "ns_dtype": None,
        "ns_eps": 1e-7,
        "adjust_lr": "original",
        "layout": None,
        "cautious_weight_decay": False,
        "ns_coefficients": "keller2024",
        "ns_safety": None,
        "row_equilibration": False,
        "renormalization": False,
        "normuon": None,
        "normuon_beta2": 0.95,
        "batch_axes": 0,
        "num_heads": None,
        "split_sizes": None,
    }
    assert rest["hyperparameters"]["eps"] == 1e-8 and rest["hyperparameters"]["weight_decay"] == 0.01
    assert rest["scheduled"] == ["betas[1]"] and hidden["scheduled"] == []
    params_meta = metadata["parameters"]
    assert params_meta["layers.1.mlp.weight"] == {
        "owner": "hidden",
        "slots": {"v": {"shape": [16, 8], "dtype": "float32"}},
    }
    assert params_meta["norm.scale"]["owner"] == "rest"
    assert params_meta["norm.scale"]["slots"] == {
        "m": {"shape": [8], "dtype": "float32"},
        "v": {"shape": [8], "dtype": "float32"},
    }
    assert set(params_meta) == {k.rpartition("/")[0] for k in keys if not k.startswith("@")}
    assert metadata["checksum"]["algorithm"] == "crc32" and len(metadata["checksum"]["value"]) == 8
    # read() gives the same, checksum verified
    arrays, read_meta = checkpoint.read(path)
    assert read_meta == metadata and set(arrays) == keys


def test_loading_never_unpickles(tmp_path, monkeypatch):
    values = model_values()
    opt = muon_adamw()
    train(opt, on(values, "numpy"), "numpy", 2)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(opt, path)
    npz = tmp_path / "opt.npz"
    np.savez(npz, **{k: numpy_of(v) for k, v in tree_flatten(opt.state)})

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    for source in (path, npz):
        fresh = muon_adamw()
        assert checkpoint.load(fresh, source, params=on(values, "numpy")).ok
        assert_bit_identical(slots_by_path(fresh), slots_by_path(opt))
    # an .npz holding an object array is refused, not unpickled
    evil = tmp_path / "evil.npz"
    np.savez(evil, step=np.array(1, np.uint64), **{"w.m": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(ValueError):
        checkpoint.load(muon_adamw(), evil, params=on(values, "numpy"))


# ------------------------------------------------------------------------------ 5. atomic, checksummed files
def small_optimizer():
    return optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(optim.cosine_decay(1e-3, 10))], [lambda p, w: p == "w"])


def small_params():
    return {"w": np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4), "b": np.linspace(0, 1, 4, dtype=np.float32)}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A small checkpoint (so that every byte of it can be damaged) and the state it holds."""
    opt, params = small_optimizer(), small_params()
    for step in range(3):
        opt.update(params, tree_map(lambda p: np.full_like(p, 0.1 * (step + 1)), params))
    path = tmp_path_factory.mktemp("small") / "opt.safetensors"
    checkpoint.save(opt, path)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    return data, header_end, state_by_key(opt), checkpoint.read(path)[0]


def _region(position, header_end, data):
    if position < 8:
        return "length"
    if position >= header_end:
        return "data"
    metadata_start = data.index(b'"treeopt":"') + len(b'"treeopt":')
    text = json.loads(data[8:header_end])["__metadata__"]["treeopt"]
    metadata_end = metadata_start + len(json.dumps(text))  # the JSON string, quotes included
    assert data[metadata_start:metadata_end] == json.dumps(text).encode()
    return "metadata" if metadata_start <= position < metadata_end else "header"


def _attempt(tmp_path, damaged, expected_state, expected_arrays):
    """Load and read the damaged bytes: ``"error"``, or ``"same"`` when what came back is bit-identical to
    the undamaged checkpoint. A load of different values fails the test."""
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damaged)
    outcomes = []
    try:
        arrays, _ = checkpoint.read(path)
    except Exception as error:  # noqa: BLE001 - the type is checked below
        _check_error(error)
        outcomes.append("error")
    else:
        assert_bit_identical(arrays, expected_arrays)
        outcomes.append("same")
    opt = small_optimizer()
    try:
        checkpoint.load(opt, path, params=small_params())
    except Exception as error:  # noqa: BLE001
        _check_error(error)
        outcomes.append("error")
    else:
        assert_bit_identical(state_by_key(opt), expected_state)
        outcomes.append("same")
    return outcomes[1]


def _check_error(error):
    assert isinstance(error, checkpoint.CheckpointError) or any(
        word in str(error).lower() for word in ("corrupt", "truncat")
    ), f"unclear error {type(error).__name__}: {error}"


def test_a_truncated_file_is_an_error_at_every_offset(tmp_path, small_checkpoint):
    data, header_end, state, arrays = small_checkpoint
    offsets = list(range(len(data)))  # every offset: in the length, the header, the metadata and the data
    assert any(o < 8 for o in offsets) and any(8 <= o < header_end for o in offsets) and offsets[-1] > header_end
    for offset in offsets:
        assert _attempt(tmp_path, data[:offset], state, arrays) == "error", offset


def saved_larger_checkpoint(tmp_path):
    """A Muon + AdamW checkpoint after two steps: its values, optimizer, path, bytes and the
    end of its header."""
    values = model_values()
    opt = muon_adamw()
    train(opt, on(values, "numpy"), "numpy", 2)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(opt, path)
    data = path.read_bytes()
    return values, opt, path, data, 8 + int.from_bytes(data[:8], "little")


def test_random_truncations_of_a_larger_checkpoint(tmp_path):
    values, opt, path, data, header_end = saved_larger_checkpoint(tmp_path)
    rng = random.Random(1234)
    offsets = [rng.randrange(0, header_end) for _ in range(15)] + [
        rng.randrange(header_end, len(data)) for _ in range(15)
    ]
    for offset in offsets:
        path.write_bytes(data[:offset])
        with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupted"):
            checkpoint.load(muon_adamw(), path, params=on(values, "numpy"))
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.read(path)


def test_a_bit_flip_anywhere_is_an_error_never_wrong_values(tmp_path, small_checkpoint):
    data, header_end, state, arrays = small_checkpoint
    rng = random.Random(20240601)
    outcomes = {"length": [], "header": [], "metadata": [], "data": []}
    harmless = []
    for position in range(len(data)):  # every byte, one seeded random bit of it
        bit = rng.randrange(8)
        damaged = bytearray(data)
        damaged[position] ^= 1 << bit
        outcome = _attempt(tmp_path, bytes(damaged), state, arrays)
        outcomes[_region(position, header_end, data)].append(outcome)
        if outcome == "same":
            harmless.append(data[max(0, position - 12) : position + 1])
    assert all(len(v) > 0 for v in outcomes.values()), {k: len(v) for k, v in outcomes.items()}
    # the length, the tensor index and every byte of tensor data are always caught
    for region in ("length", "header", "data"):
        assert set(outcomes[region]) == {"error"}, region
    # in the metadata JSON only flips that change no value can go unnoticed (e.g. 1e-08 -> 1E-08, or the
    # unused name of the checksum algorithm); they loaded the very same state (checked in _attempt)
    assert outcomes["metadata"].count("same") <= 0.1 * len(outcomes["metadata"]), harmless


def test_bit_flips_in_a_larger_checkpoint(tmp_path):
    values, opt, path, data, header_end = saved_larger_checkpoint(tmp_path)
    rng = random.Random(99)
    positions = [rng.randrange(header_end, len(data)) for _ in range(30)] + [
        rng.randrange(8, header_end) for _ in range(30)
    ]
    expected = state_by_key(opt)
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        fresh = muon_adamw()
        try:
            checkpoint.load(fresh, path, params=on(values, "numpy"))
        except checkpoint.CheckpointError:
            continue
        assert position < header_end, position  # tensor data is always covered by the checksum
        assert_bit_identical(state_by_key(fresh), expected)


def test_a_checksum_mismatch_names_the_corruption(tmp_path, small_checkpoint):
    data = bytearray(small_checkpoint[0])
    data[-1] ^= 0x40  # the last byte of tensor data
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch, the file is corrupted"):
        checkpoint.read(path)
    with pytest.raises(FileNotFoundError):
        checkpoint.load(small_optimizer(), tmp_path / "nowhere.safetensors", params=small_params())


def test_a_damaged_npz_never_loads_wrong_values(tmp_path):
    values = model_values()
    opt = muon_adamw()
    train(opt, on(values, "numpy"), "numpy", 2)
    data_path = tmp_path / "opt.npz"
    np.savez(data_path, **{k: numpy_of(v) for k, v in tree_flatten(opt.state)})
    data = data_path.read_bytes()
    expected = state_by_key(opt)
    rng = random.Random(5)
    path = tmp_path / "damaged.npz"
    errors = 0
    for trial in range(60):
        damaged = bytearray(data)
        if trial % 2:
            damaged = damaged[: rng.randrange(len(data))]
        else:
            damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        fresh = muon_adamw()
        try:
            checkpoint.load(fresh, path, params=on(values, "numpy"))
        except checkpoint.CheckpointError:
            errors += 1
            continue
        assert trial % 2 == 0  # only a flip in the zip's own bookkeeping can leave the arrays intact
        assert_bit_identical(state_by_key(fresh), expected)
    assert errors >= 40


def test_a_damaged_npz_is_a_checkpoint_error(tmp_path):
    values = model_values()
    opt = muon_adamw()
    train(opt, on(values, "numpy"), "numpy", 1)
    path = tmp_path / "opt.npz"
    np.savez(path, **{k: numpy_of(v) for k, v in tree_flatten(opt.state)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.read(path)
    damaged = bytearray(data)
    damaged[len(data) // 3] ^= 0x10  # inside a stored array
    path.write_bytes(bytes(damaged))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(muon_adamw(), path, params=on(values, "numpy"))


def _writer(path, elements, start):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_checkpoint_writer.py"), str(path), str(elements), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )


def _uniform_value(path):
    """The one value every slot and the learning rate of a writer's checkpoint hold."""
    sys.path.insert(0, HERE)
    try:
        from _checkpoint_writer import state_for
    finally:
        sys.path.remove(HERE)
    opt = state_for(ELEMENTS)
    assert checkpoint.load(opt, path).ok
    values = {
        float(np.unique(a)[0]) for _, slots in opt.store.items() for a in slots.values() if np.unique(a).size == 1
    }
    assert len(values) == 1 and all(np.unique(a).size == 1 for _, s in opt.store.items() for a in s.values())
    value = values.pop()
    assert as_float64(opt.learning_rate) == value
    return int(value)


ELEMENTS = 1 << 20  # two slots of 4 MiB each


def test_a_save_killed_at_any_moment_leaves_the_last_good_checkpoint(tmp_path):
    sys.path.insert(0, HERE)
    try:
        from _checkpoint_writer import fill, state_for
    finally:
        sys.path.remove(HERE)
    path = tmp_path / "opt.safetensors"
    first = state_for(ELEMENTS)
    fill(first, 0)
    checkpoint.save(first, path)
    rng = random.Random(7)
    last = 0
    killed_mid_run = 0
    for iteration in range(15):
        start = (iteration + 1) * 1000
        writer = _writer(path, ELEMENTS, start)
        try:
            if iteration % 3:  # after its first save completed, at a random moment of the next ones
                line = writer.stdout.readline()
                assert line.strip() == str(start), line
                last = start
                killed_mid_run += 1
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            out, _ = writer.communicate()
        completed = [int(x) for x in out.split()]
        if completed:
            last = completed[-1]
        value = _uniform_value(path)  # loads, checksum verified: a whole checkpoint
        # the last completed save, or the one whose rename happened just before the kill
        assert value in (last, last + 1) or (value == start and last < start), (value, last)
        last = value
    leftovers = [name for name in os.listdir(tmp_path) if name != "opt.safetensors"]
    assert all(name.startswith(".") for name in leftovers), leftovers  # hidden temporary files only
    assert killed_mid_run >= 5


# ------------------------------------------------------------------------------ files changed during a load, saves during steps
def _two_checkpoints(tmp_path):
    """Two whole checkpoints of the same optimizer (after 2 and after 3 steps): the path
    holding the first, and the bytes of the second."""
    values = model_values()
    opt = muon_adamw()
    params = on(values, "numpy")
    train(opt, params, "numpy", 2)
    path = tmp_path / "opt.safetensors"
    checkpoint.save(opt, path)
    first = state_by_key(opt)
    train(opt, params, "numpy", 1, start=2)
    checkpoint.save(opt, tmp_path / "later.safetensors")
    return values, path, first, (tmp_path / "later.safetensors").read_bytes()


def test_a_file_rewritten_during_a_load_loads_what_was_checked(tmp_path, monkeypatch):
    """``cp`` of another checkpoint over the file while it loads: the load copies what its
    checksum checked (the file as it was when the load opened it), never a mix."""
    from treeopt.checkpoint import validate

    values, path, first, later = _two_checkpoints(tmp_path)
    checked = validate.tensors

    def rewrite_then_check(tensors, metadata):  # between the checksum and the copy
        with open(path, "r+b") as file:
            file.write(later)
            file.truncate(len(later))
        return checked(tensors, metadata)

    monkeypatch.setattr(validate, "tensors", rewrite_then_check)
    opt = muon_adamw()
    assert checkpoint.load(opt, path, params=on(values, "numpy")).ok
    assert_bit_identical(state_by_key(opt), first)


def test_a_truncation_during_a_load_does_not_kill_the_process(tmp_path):
    """The same truncation in a process of its own: a load that read the file through a
    memory map would read zeros from it, or die of SIGBUS past its first page."""
    _two_checkpoints(tmp_path)
    script = f"""
import sys; sys.path.insert(0, {HERE!r})
from checkpoint_helpers import model_values, muon_adamw, on
from treeopt import checkpoint
from treeopt.checkpoint import validate
checked = validate.tensors
def truncate_then_check(tensors, metadata):
    open({str(tmp_path / "opt.safetensors")!r}, "r+b").truncate(100)
    return checked(tensors, metadata)
validate.tensors = truncate_then_check
print(checkpoint.load(muon_adamw(), {str(tmp_path / "opt.safetensors")!r}, params=on(model_values(), "numpy")).ok)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", (done.returncode, done.stderr[-2000:])


def test_where_no_in_memory_file_can_be_made_the_bytes_are_parsed(tmp_path, monkeypatch):
    values, path, first, _ = _two_checkpoints(tmp_path)
    monkeypatch.delattr(os, "memfd_create")
    opt = muon_adamw()
    assert checkpoint.load(opt, path, params=on(values, "numpy")).ok
    assert_bit_identical(state_by_key(opt), first)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupted"):
        checkpoint.read(path)


def test_saves_while_another_thread_steps_are_each_one_whole_step(tmp_path):
    """The save holds the optimizer's step lock: every file is the state after some step k,
    slot for slot (before, saves could hold step k's count with step k-1's slots, or fail
    their own checksum)."""
    import threading

    values = model_values()
    reference, states = muon_adamw(), {}
    params = on(values, "numpy")
    for step in range(60):
        train(reference, params, "numpy", 1, start=step)
        states[step + 1] = state_by_key(reference)
    opt = muon_adamw()
    live = train(opt, on(values, "numpy"), "numpy", 1)
    stop = threading.Event()

    def training():
        for step in range(1, 60):
            if stop.is_set():
                return
            train(opt, live, "numpy", 1, start=step)

    worker = threading.Thread(target=training)
    worker.start()
    steps = set()
    try:
        for i in range(25):
            checkpoint.save(opt, tmp_path / "opt.safetensors")
            loaded = muon_adamw()
            assert checkpoint.load(loaded, tmp_path / "opt.safetensors", params=on(values, "numpy")).ok
            step = int(loaded.step)
            assert_bit_identical(state_by_key(loaded), states[step])
            steps.add(step)
    finally:
        stop.set()
        worker.join()
    assert len(steps) > 1  # the saves did fall between different steps
