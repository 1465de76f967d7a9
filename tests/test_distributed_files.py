"""treeopt.distributed.files: checkpoint folders written by several ranks keep the single
file's guarantees. The catalogue (as tests/test_reliability.py's): a folder written by 2
ranks, damaged one way, loaded by 1 process; each case raises a CheckpointError naming what
is wrong and leaves the optimizer and the parameters bit-identical. Then what must keep
working (strays ignored, folders without a list of files), and 2 ranks killed with SIGKILL
while they save again and again into one folder: the folder always loads, as the last
checkpoint whose save was committed."""

import json
import os
import random
import shutil
import signal
import tempfile
import time
import warnings

import pytest

torch = pytest.importorskip("torch", reason="distributed tests need torch")
import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

import treeopt as optim  # noqa: E402
import treeopt.torch  # noqa: E402
from treeopt import checkpoint, engine  # noqa: E402
from treeopt.distributed import files as folders  # noqa: E402
from _world import _rank_main, run_world, warm_up  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

SHAPES = {"blocks.0.weight": (24, 16), "blocks.1.weight": (16, 24), "blocks.1.bias": (16,), "head.weight": (5, 16)}


def make_params(shapes=SHAPES):
    generator = torch.Generator().manual_seed(0)
    return [(name, torch.nn.Parameter(torch.randn(shape, generator=generator))) for name, shape in shapes.items()]


def muon_adamw():
    return optim.MultiOptimizer(
        [optim.Muon(0.02), optim.AdamW(3e-3)], [lambda name, p: name.startswith("blocks.") and p.ndim == 2]
    )


def take_steps(params, opt, start, stop):
    for step in range(start, stop):
        generator = torch.Generator().manual_seed(100 + step)
        for _, p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        opt.step()


def save_after(rank, world, folder, steps):
    params = make_params()
    opt = treeopt.torch.Optimizer(params, muon_adamw(), sharding="zero1")
    take_steps(params, opt, 0, steps)
    checkpoint.save(opt, folder)


def state_of(opt):
    return {f"{path}/{s}": v.clone() for path, v in _slots(opt) for s, v in v.items()}


def _slots(opt):
    return [
        (".".join(map(str, keys)), slots)
        for child in opt.optimizer.stateful()
        for keys, slots in engine.slot_items(child)
    ]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders written by 2 ranks: after 3 steps, and (another run) after 5."""
    warm_up()
    root = tmp_path_factory.mktemp("folders")
    run_world(save_after, 2, str(root / "three"), 3)
    run_world(save_after, 2, str(root / "five"), 5)
    return root


def fresh():
    params = make_params()
    return params, treeopt.torch.Optimizer(params, muon_adamw())


def fingerprint(params, opt):
    state = {k: v.numpy().tobytes() for k, v in state_of(opt).items()}
    scalars = [(int(c.step), float(c.learning_rate)) for c in opt.optimizer.stateful()]
    groups = [{k: v for k, v in g.items() if k not in ("params",)} for g in opt.param_groups]
    return state, scalars, repr(groups), {n: p.detach().numpy().tobytes() for n, p in params}


def version_of(folder):
    return os.path.join(folder, folders.read_manifest(folder)["save"]["folder"])


def files_of(folder):
    return sorted(folders.read_manifest(folder)["save"]["files"])


# ---------------------------------------------------------------------------------- the catalogue
def other_runs_file(folder, saved):
    """A rank file of the step-5 run copied over the step-3 folder's."""
    name = files_of(folder)[0]
    shutil.copyfile(os.path.join(version_of(saved / "five"), name), os.path.join(version_of(folder), name))


def flipped_bit(folder, saved):
    path = os.path.join(version_of(folder), files_of(folder)[1])
    data = bytearray(open(path, "rb").read())
    data[len(data) * 2 // 3] ^= 0x04
    open(path, "wb").write(bytes(data))


def truncated(folder, saved):
    path = os.path.join(version_of(folder), files_of(folder)[0])
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def removed(folder, saved):
    os.remove(os.path.join(version_of(folder), files_of(folder)[1]))


def version_gone(folder, saved):
    shutil.rmtree(version_of(folder))


def edit_manifest(edit):
    def damage(folder, saved):
        path = os.path.join(folder, folders.METADATA)
        manifest = json.load(open(path))
        edit(manifest)
        json.dump(manifest, open(path, "w"))

    return damage


def manifest_text(text):
    def damage(folder, saved):
        open(os.path.join(folder, folders.METADATA), "w").write(text)

    return damage


def another_shape(folder, saved):
    """Not a damage: the optimizer's parameter has another shape than the saved one."""


CASES = [
    ("a rank file of another run", other_runs_file, r"SHA-256 is not the manifest's|bytes, the manifest says"),
    ("one bit flipped in a rank file", flipped_bit, r"shard-\S+\.safetensors: its SHA-256 is not the manifest's"),
    ("a rank file truncated", truncated, r"shard-\S+\.safetensors has \d+ bytes, the manifest says \d+"),
    ("a rank file missing", removed, r"shard-\S+\.safetensors is listed in the manifest but missing"),
    ("the version folder missing", version_gone, r"is listed in the manifest but missing"),
    ("a manifest that is not JSON", manifest_text('{"format": '), r"treeopt\.json is not readable JSON"),
    ("a manifest that is a list", manifest_text("[]"), r"must hold a JSON object, got list"),
    (
        "a manifest pointing outside the folder",
        edit_manifest(lambda m: m["save"].__setitem__("folder", "../elsewhere")),
        r"'save' folder '\.\./elsewhere' is not the step-<step>-<id>",
    ),
    (
        "a manifest listing a file outside the folder",
        edit_manifest(lambda m: m["save"]["files"].__setitem__("../x.safetensors", {"bytes": 1, "sha256": "0" * 64})),
        r"'\.\./x\.safetensors' is not the name of a \.safetensors file",
    ),
    (
        "a manifest whose step is not the metadata's",
        edit_manifest(lambda m: m.__setitem__("step", 7)),
        r"'save' step 3 is not the metadata's step 7",
    ),
    (
        "a manifest without a hash",
        edit_manifest(lambda m: [e.pop("sha256") for e in m["save"]["files"].values()]),
        r"must have 'bytes' \(an integer\) and 'sha256'",
    ),
]


@pytest.mark.parametrize("label, damage, match", CASES, ids=[c[0] for c in CASES])
def test_a_damaged_folder_raises_a_clear_error_and_changes_nothing(saved, tmp_path, label, damage, match):
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved / "three", folder)
    damage(str(folder), saved)
    params, opt = fresh()
    take_steps(params, opt, 0, 1)
    before = fingerprint(params, opt)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.load(opt, folder)
    assert fingerprint(params, opt) == before


def test_dcp_errors_are_checkpoint_errors_that_name_the_key(saved):
    """A parameter of another shape than the saved one: DCP's CheckpointException (a
    BaseException whose message is a traceback) comes out as a CheckpointError (an
    Exception) that names the key."""
    shapes = dict(SHAPES, **{"head.weight": (6, 16)})
    params = make_params(shapes)
    opt = treeopt.torch.Optimizer(params, muon_adamw())
    take_steps(params, opt, 0, 1)
    before = fingerprint(params, opt)
    with pytest.raises(Exception) as caught:
        checkpoint.load(opt, saved / "three")
    assert isinstance(caught.value, checkpoint.CheckpointError), type(caught.value)
    assert "torch.distributed.checkpoint could not load" in str(caught.value)
    assert "'head.weight/" in str(caught.value) and "Traceback" not in str(caught.value)
    assert fingerprint(params, opt) == before


# ---------------------------------------------------------------------------------- what must keep working
def reference_state(steps):
    params, opt = fresh()
    take_steps(params, opt, 0, steps)
    return state_of(opt)


def assert_state(opt, steps):
    expected, found = reference_state(steps), state_of(opt)
    assert set(found) == set(expected)
    for key, value in expected.items():
        assert torch.equal(found[key], value), key


def test_strays_in_the_folder_are_ignored_by_name(saved, tmp_path):
    """A stray .safetensors beside the manifest or inside the version folder (a file of
    another save, copied there) is never read: the load is the listed files'."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved / "three", folder)
    other = version_of(saved / "five")
    for name in files_of(saved / "five"):
        shutil.copyfile(os.path.join(other, name), folder / name)
        shutil.copyfile(os.path.join(other, name), os.path.join(version_of(folder), "zz-" + name))
    params, opt = fresh()
    assert checkpoint.load(opt, folder).ok
    assert int(opt.optimizer.step) == 3
    assert_state(opt, 3)


def test_a_folder_without_a_list_of_files_is_read_as_before(saved, tmp_path):
    """A folder whose manifest lists no files (written before folders had them): every
    .safetensors file beside the manifest, as then."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved / "three", folder)
    version = version_of(folder)
    for name in files_of(folder):
        shutil.move(os.path.join(version, name), folder / name)
    manifest = json.load(open(folder / folders.METADATA))
    del manifest["save"]
    json.dump(manifest, open(folder / folders.METADATA, "w"))
    params, opt = fresh()
    assert checkpoint.load(opt, folder).ok
    assert_state(opt, 3)


def test_a_resave_replaces_the_version_after_the_commit(saved, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved / "three", folder)
    first = version_of(folder)
    run_world(save_after, 2, str(folder), 5)
    assert version_of(folder) != first and not os.path.exists(first)  # the old version went after the commit
    assert [n for n in os.listdir(folder) if n.startswith("step-")] == [os.path.basename(version_of(folder))]
    params, opt = fresh()
    assert checkpoint.load(opt, folder).ok
    assert_state(opt, 5)


# ---------------------------------------------------------------------------------- killed while saving
def save_forever(rank, world, folder, log):
    """Train and save after every step until killed; rank 0 logs ``begin k`` before the
    save of step k and ``end k`` once it returned (the manifest was committed)."""
    params = make_params()
    opt = treeopt.torch.Optimizer(params, muon_adamw(), sharding="zero1")
    step = 0
    while True:
        take_steps(params, opt, step, step + 1)
        step += 1
        if rank == 0:
            _log(log, f"begin {step}")
        checkpoint.save(opt, folder)
        if rank == 0:
            _log(log, f"end {step}")


def _log(path, line):
    with open(path, "a") as file:
        file.write(line + "\n")
        file.flush()
        os.fsync(file.fileno())


def load_step(rank, world, folder):
    params, opt = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = checkpoint.load(opt, folder)
    step = int(opt.optimizer.step)
    return report.ok, step, _same(state_of(opt), reference_state(step))


def _same(found, expected):
    return set(found) == set(expected) and all(torch.equal(found[k], v) for k, v in expected.items())


def kill_loop(tmp_path, iterations, seed):
    folder, log = str(tmp_path / "checkpoint"), str(tmp_path / "log")
    run_world(save_after, 2, folder, 1)  # a first good checkpoint
    rng = random.Random(seed)
    last, mid_save = 1, 0
    for _ in range(iterations):
        open(log, "w").close()
        with tempfile.TemporaryDirectory() as store:
            context = mp.start_processes(
                _rank_main, args=(save_forever, 2, store, 120, (folder, log)), nprocs=2, join=False, start_method="fork"
            )
            deadline = time.monotonic() + 60
            while "end 1" not in open(log).read() and time.monotonic() < deadline:  # the world is up
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            for process in context.processes:
                os.kill(process.pid, signal.SIGKILL)
            for process in context.processes:
                process.join()
        lines = open(log).read().split()
        ended = [int(n) for word, n in zip(lines[::2], lines[1::2]) if word == "end"]
        begun = [int(n) for word, n in zip(lines[::2], lines[1::2]) if word == "begin"]
        mid_save += bool(begun) and (not ended or begun[-1] > ended[-1])
        committed = ended[-1] if ended else last
        ok, step, same = run_world(load_step, 1, folder)[0]
        # the last save that returned, or the one killed after its commit
        assert ok and step in (committed, committed + 1), (step, committed, lines[-4:])
        assert same, f"the loaded state is not the state after {step} steps"
        versions = [n for n in os.listdir(folder) if n.startswith("step-")]
        assert len(versions) <= 3, versions  # killed before removing the old one: removed at the next save
        last = step
    return mid_save


def test_ranks_killed_while_saving_leave_the_last_committed_checkpoint(tmp_path):
    assert kill_loop(tmp_path, iterations=3, seed=20) >= 1


@pytest.mark.slow
def test_ranks_killed_while_saving_leave_the_last_committed_checkpoint_many_times(tmp_path):
    assert kill_loop(tmp_path, iterations=25, seed=21) >= 15
