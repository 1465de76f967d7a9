"""treeopt on several processes: DDP, ZeRO-1 and checkpoints that reshard, on 1, 2 and 4 forked
CPU ranks with gloo (see tests/_world.py). Each world takes well under a second once warm.

The reference is always one process given the same averaged gradients: ZeRO-1 must equal it
bit for bit, because each whole matrix and each element is updated by the same rule, only
on another rank.
"""

import json
import math

import pytest

torch = pytest.importorskip("torch", reason="distributed tests need torch")
import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import treeopt as optim  # noqa: E402
import treeopt.torch  # noqa: E402
from treeopt.distributed import ownership  # noqa: E402
from _world import run_world, warm_up  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module", autouse=True)
def warm():
    warm_up()
    train(0, 1, 2, None)  # numba compiles the fused loops once here, not in every rank


# matrices of every kind: wide, tall, rows not divisible by 4, fewer rows than ranks
SHAPES = {
    "blocks.0.attn.weight": (96, 64),
    "blocks.0.attn.bias": (96,),
    "blocks.0.mlp.weight": (64, 96),
    "blocks.1.attn.weight": (128, 32),
    "blocks.1.mlp.weight": (18, 32),
    "blocks.1.gate.weight": (3, 8),
    "embed.weight": (64, 16),
    "head.weight": (10, 16),
    "norm.weight": (16,),
    "norm.bias": (16,),
}
MUON_MATRICES = [n for n, s in SHAPES.items() if n.startswith("blocks.") and len(s) == 2]


def hidden_matrix(name, param):
    return name.startswith("blocks.") and param.ndim == 2


def muon_adamw(**options):
    return optim.MultiOptimizer([optim.Muon(0.02, weight_decay=0.01), optim.AdamW(3e-3)], [hidden_matrix], **options)


def make_params():
    generator = torch.Generator().manual_seed(0)
    return [(name, torch.nn.Parameter(torch.randn(shape, generator=generator))) for name, shape in SHAPES.items()]


def gradients(step, rank=None, nan_at=None):
    """The averaged gradients of ``step``, as DDP gives every rank the same ones."""
    generator = torch.Generator().manual_seed(100 + step)
    grads = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    if nan_at is not None and nan_at[:2] == (step, rank):
        grads[nan_at[2]][0] = float("nan")
    return grads


def take_steps(opt, params, steps):
    """Step ``opt`` with the averaged gradients of each step in ``steps``, set on ``params``."""
    for step in steps:
        for (name, p), g in zip(params, gradients(step).values()):
            p.grad = g
        opt.step()


def train(rank, world, steps, sharding="zero1", options=None, nan_at=None, count_ns=False):
    """``steps`` steps; returns the parameters, what each rank owns and its counts."""
    import treeopt.rules.muon as muon_rule

    calls = []
    if count_ns:
        original = muon_rule.newton_schulz
        muon_rule.newton_schulz = lambda x, *rest: calls.append(tuple(x.shape)) or original(x, *rest)
    params = make_params()
    opt = treeopt.torch.Optimizer(params, muon_adamw(**(options or {})), sharding=sharding if world > 1 else None)
    for step in range(steps):
        for (name, p), g in zip(params, gradients(step, rank, nan_at).values()):
            p.grad = g
        opt.step()
    state = opt.optimizer.state
    return {
        "params": {n: p.detach().clone() for n, p in params},
        "ns_calls": calls,
        "skipped": state.get("skipped_steps", 0),
        "steps": [int(o.step) for o in opt.optimizer.optimizers],
        "state_bytes": _state_bytes(opt.optimizer),
        "owned": sorted(getattr(opt._distributed, "local", {}) or {}),
        "sent": getattr(getattr(opt._distributed, "comm", None), "sent_bytes", 0),
        "collectives": getattr(getattr(opt._distributed, "comm", None), "calls", 0),
    }


def _state_bytes(multi):
    total = 0
    for child in multi.optimizers:
        for _, slots in child.store.items():
            total += sum(v.numel() * v.element_size() for v in slots.values())
    return total


def assert_same_params(results, reference):
    for rank, result in enumerate(results):
        for name, value in reference["params"].items():
            assert torch.equal(result["params"][name], value), f"rank {rank}: {name} differs from one process"


# ---------------------------------------------------------------------------------- ownership (no processes)
def test_ownership_balances_newton_schulz_and_bytes_deterministically():
    entries = [
        ownership.Entry(
            f"m{i}",
            (768, 768 * (1 + i % 4)),
            ownership.ORTH,
            4 * 768 * 768 * (1 + i % 4),
            4 * 768 * 768 * (1 + i % 4),
            ownership.newton_schulz_flops((768, 768 * (1 + i % 4)), 5),
        )
        for i in range(48)
    ]
    entries.append(ownership.Entry("wte", (50257, 768), ownership.ELEMENTWISE, 8 * 50257 * 768, 4 * 50257 * 768))
    entries += [ownership.Entry(f"b{i}", (768,), ownership.ELEMENTWISE, 8 * 768, 4 * 768) for i in range(50)]
    plan = ownership.assign(entries, 4)
    assert plan.owner["wte"] == "rows"
    state, flops = plan.imbalance()
    assert state <= 1.15 and flops <= 1.3
    assert sum(plan.state_bytes) == sum(e.state_bytes for e in entries)
    assert sum(plan.flops) == sum(e.flops for e in entries)
    assert ownership.assign(list(reversed(entries)), 4).owner == plan.owner  # order does not matter
    assert ownership.assign(entries, 4).fingerprint() == plan.fingerprint()
    # every row of the split parameter has exactly one owner, as torch.chunk splits them
    assert [plan.rows("wte", r) for r in range(4)] == [(0, 12565), (12565, 25130), (25130, 37695), (37695, 50257)]


def test_ownership_ties_are_broken_by_name_and_small_worlds_own_everything():
    entries = [ownership.Entry(n, (4, 4), ownership.ORTH, 64, 64, 100) for n in ("b", "a", "c")]
    plan = ownership.assign(entries, 2)
    assert plan.owner == {"b": 1, "a": 0, "c": 0}
    assert ownership.assign(entries, 1).owned(0) == ["b", "a", "c"]
    assert ownership.row_range(3, 4, 3) == (3, 3)  # a rank with no rows


# ---------------------------------------------------------------------------------- ZeRO-1
@pytest.fixture(scope="module")
def reference():
    return run_world(train, 1, 3, None, None, None, True)[0]


@pytest.mark.parametrize("world", [2, 4])
def test_zero1_is_bit_identical_to_one_process_and_runs_newton_schulz_once_per_matrix(world, reference):
    results = run_world(train, world, 3, "zero1", None, None, True)
    assert_same_params(results, reference)
    owned = [set(r["owned"]) for r in results]
    assert set().union(*owned) == set(SHAPES)
    assert all(sum(n in o for o in owned) == 1 for n in MUON_MATRICES)  # Muon matrices stay whole
    assert all("embed.weight" in o for o in owned)  # the largest elementwise state is split by rows
    # Newton-Schulz: once per matrix per step, over all ranks together, as in one process
    assert sum(len(r["ns_calls"]) for r in results) == len(reference["ns_calls"]) == 3 * len(MUON_MATRICES)
    # optimizer memory per rank is what the plan says, and adds up to one process's
    assert sum(r["state_bytes"] for r in results) == reference["state_bytes"]
    plan = ownership.assign([_entry(n, s) for n, s in SHAPES.items()], world)
    assert [r["state_bytes"] for r in results] == plan.state_bytes
    # one all-gather per step (one dtype, one bucket), plus the start-up plan check
    assert all(r["collectives"] == 3 + 1 for r in results)


def _entry(name, shape):
    if hidden_matrix(name, torch.empty(shape)):
        return ownership.Entry(
            name,
            shape,
            ownership.ORTH,
            4 * math.prod(shape),
            4 * math.prod(shape),
            ownership.newton_schulz_flops(shape, 5),
        )
    return ownership.Entry(name, shape, ownership.ELEMENTWISE, 8 * math.prod(shape), 4 * math.prod(shape))


def _owned_by(world, rank):
    plan = ownership.assign([_entry(n, s) for n, s in SHAPES.items()], world)
    return next(n for n in SHAPES if plan.owner[n] == rank)


WHOLE_MODEL = dict(
    max_grad_norm=5.0, skip_nonfinite=True, accumulate=[1, 2], lr_schedule=lambda step: 1.0 / (1.0 + step)
)


@pytest.mark.parametrize("world", [2, 4])
def test_zero1_whole_model_options_agree_on_every_rank(world):
    """Global clipping over every gradient, a NaN in one rank's copy of a gradient it owns
    (the step is skipped on every rank), accumulation and a shared schedule."""
    name = _owned_by(world, world - 1)
    results = run_world(train, world, 5, "zero1", WHOLE_MODEL, (2, world - 1, name))
    expected = run_world(train, 1, 5, None, WHOLE_MODEL, (2, 0, name))[0]
    assert expected["skipped"] == 1
    assert [r["skipped"] for r in results] == [1] * world
    assert all(r["steps"] == expected["steps"] for r in results)
    assert_same_params(results, expected)


def test_a_rank_that_owns_no_parameter_of_a_group_still_steps_it():
    one = {"blocks.0.attn.weight": (8, 8), "norm.weight": (3,)}  # 4 ranks, 2 parameters (too few rows to split)

    def run(rank, world):
        params = [(n, torch.nn.Parameter(torch.ones(s))) for n, s in one.items()]
        opt = treeopt.torch.Optimizer(params, muon_adamw(), sharding="zero1")
        for _ in range(2):
            for _, p in params:
                p.grad = torch.full_like(p, 0.5)
            opt.step()
        return (
            [int(o.step) for o in opt.optimizer.optimizers],
            {n: p.detach() for n, p in params},
            sorted(opt._distributed.local),
        )

    results = run_world(run, 4)
    assert [r[0] for r in results] == [[2, 2]] * 4
    assert sum(len(r[2]) for r in results) == 2 and [] in [r[2] for r in results]
    assert all(torch.equal(r[1]["norm.weight"], results[0][1]["norm.weight"]) for r in results)


# the rank-dependent filter gives rank 0's embedding to Muon and matches nothing on rank 1: the
# guards warn (forked ranks inherit the test's warning filters), which is not what is tested
@pytest.mark.filterwarnings("ignore::treeopt.RoutingWarning")
def test_ranks_that_route_differently_fail_at_construction():
    def run(rank, world):
        params = make_params()
        rank_filter = lambda name, p: p.ndim == 2 and rank == 0  # a filter that depends on the rank
        opt = optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [rank_filter])
        treeopt.torch.Optimizer(params, opt, sharding="zero1")

    with pytest.raises(Exception, match="plans differently"):
        run_world(run, 2)


# ---------------------------------------------------------------------------------- DDP
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 16)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])
        self.head = torch.nn.Linear(16, 10, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def ddp_train(rank, world, steps):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(Net())
    opt = treeopt.torch.Optimizer(model, muon_adamw())  # the DDP wrapper: names lose "module."
    generator = torch.Generator().manual_seed(rank)
    seen = []
    for _ in range(steps):
        tokens = torch.randint(0, 10, (4, 6), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), ((tokens + 1) % 10).flatten())
        loss.backward()
        seen.append({n: p.grad.clone() for n, p in model.module.named_parameters()})
        opt.step()
        opt.zero_grad()
    return {
        "params": {n: p.detach().clone() for n, p in model.module.named_parameters()},
        "grads": seen,
        "keys": sorted(json.loads(opt.state_dict()["metadata"])["parameters"]),
    }


def replay(rank, world, grads):
    model = Net()
    opt = treeopt.torch.Optimizer(model, muon_adamw())
    for step in grads:
        for n, p in model.named_parameters():
            p.grad = step[n]
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_is_bit_identical_to_one_process_fed_the_averaged_gradients(world):
    results = run_world(ddp_train, world, 3)
    assert all(torch.equal(r["grads"][-1]["head.weight"], results[0]["grads"][-1]["head.weight"]) for r in results)
    expected = run_world(replay, 1, results[0]["grads"])[0]
    assert_same_params(results, expected)
    assert all(not k.startswith("module.") for k in results[0]["keys"])


# the rank-dependent filter gives rank 0's embedding to Muon and matches nothing on rank 1: the
# guards warn (forked ranks inherit the test's warning filters), which is not what is tested
@pytest.mark.filterwarnings("ignore::treeopt.RoutingWarning")
def test_ddp_ranks_that_route_differently_fail_after_the_first_step():
    def run(rank, world):
        params = make_params()
        opt = treeopt.torch.Optimizer(
            params,
            optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [lambda name, p: p.ndim == 2 and rank == 0]),
        )
        for (name, p), g in zip(params, gradients(0).values()):
            p.grad = g
        opt.step()

    with pytest.raises(Exception, match="disagree on the routes"):
        run_world(run, 2)


# ---------------------------------------------------------------------------------- checkpoints that reshard
RESUME = dict(max_grad_norm=5.0, accumulate=[1, 2])


def dcp_phase(rank, world, folder, phase, calls):
    """Save after ``calls`` steps, or load and take ``calls`` more, with DCP at this world size
    (ZeRO-1 on several ranks, the plain adapter on one)."""
    import torch.distributed.checkpoint as dcp

    params = make_params()
    model = {n: p.detach() for n, p in params}
    opt = treeopt.torch.Optimizer(params, muon_adamw(**RESUME), sharding="zero1")  # at world 1 too: one layout
    first = 0
    if phase == "load":
        dcp.load({"model": model, "optim": opt}, checkpoint_id=folder)
        first = int(opt.optimizer.optimizers[1].step) * 2  # the AdamW group steps every 2 calls
    take_steps(opt, params, range(first, first + calls))
    if phase == "save":
        dcp.save({"model": model, "optim": opt}, checkpoint_id=folder)
    return {"params": {n: p.detach().clone() for n, p in params}, "metadata": opt.state_dict()["metadata"]}


@pytest.fixture(scope="module")
def uninterrupted():
    def run(rank, world):
        return dcp_phase(rank, world, None, "none", 6)

    return run_world(run, 1)[0]


@pytest.mark.parametrize("saved, loaded", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_dcp_checkpoint_saved_at_one_world_size_resumes_at_another(saved, loaded, uninterrupted, tmp_path):
    before = run_world(dcp_phase, saved, str(tmp_path), "save", 4)
    assert len({r["metadata"] for r in before}) == 1  # the same metadata on every rank
    after = run_world(dcp_phase, loaded, str(tmp_path), "load", 2)
    assert_same_params(after, uninterrupted)


def test_zero1_plan_shows_an_owner_column_and_per_rank_totals():
    def run(rank, world):
        opt = treeopt.torch.Optimizer(make_params(), muon_adamw(), sharding="zero1")
        plan = opt.plan()
        return plan.to_dict(), str(plan)

    results = run_world(run, 2)
    data, text = results[0]
    assert results[1][0] == data  # the same plan on every rank
    expected = ownership.assign([_entry(n, s) for n, s in SHAPES.items()], 2)
    assert {row["path"]: row["owner"] for row in data["parameters"]} == {n: str(o) for n, o in expected.owner.items()}
    assert [r["state_bytes"] for r in data["ranks"]] == expected.state_bytes
    assert sum(r["state_bytes"] for r in data["ranks"]) == sum(row["state_bytes"] for row in data["parameters"])
    assert "owner" in text.splitlines()[1] and "Newton-Schulz" in text


def folder_phase(rank, world, folder, phase):
    from treeopt import checkpoint

    params = make_params()
    opt = treeopt.torch.Optimizer(params, muon_adamw(**RESUME), sharding="zero1")  # at world 1 too: one layout
    first = 0
    if phase == "load":
        report = checkpoint.load(opt, folder)
        assert report.ok, str(report)
        with torch.no_grad():  # the parameters come from the model's own checkpoint; here: replayed
            for (name, p), value in zip(params, torch.load(f"{folder}/params.pt").values()):
                p.copy_(value)
        first = int(opt.optimizer.optimizers[1].step) * 2
    take_steps(opt, params, range(first, first + (4 if phase == "save" else 2)))
    if phase == "save":
        checkpoint.save(opt, folder)
        if rank == 0:
            torch.save({n: p.detach() for n, p in params}, f"{folder}/params.pt")
    return {"params": {n: p.detach().clone() for n, p in params}}


@pytest.mark.parametrize("saved, loaded", [(2, 4), (4, 1)])
def test_treeopt_checkpoint_folder_of_several_ranks_loads_at_any_world_size(saved, loaded, uninterrupted, tmp_path):
    import glob
    import subprocess
    import sys

    run_world(folder_phase, saved, str(tmp_path), "save")
    assert len(glob.glob(str(tmp_path / "step-*" / "*.safetensors"))) == saved  # one file per rank
    assert not glob.glob(str(tmp_path / "**" / ".metadata"), recursive=True)  # nothing pickled
    info = subprocess.run(
        [sys.executable, "-m", "treeopt.checkpoint", "info", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 0, info.stdout + info.stderr
    summary = json.loads(info.stdout)
    assert summary["problems"] == [] and summary["saved_world_size"] == saved
    assert summary["groups"]["Muon"]["parameters"] == len(MUON_MATRICES)
    after = run_world(folder_phase, loaded, str(tmp_path), "load")
    assert_same_params(after, uninterrupted)
    # a lost file is found by the inspector
    (sorted(tmp_path.glob("step-*/*.safetensors"))[0]).unlink()
    info = subprocess.run(
        [sys.executable, "-m", "treeopt.checkpoint", "info", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 1 and json.loads(info.stdout)["problems"]


# ---------------------------------------------------------------------------------- FSDP2 / DTensor parameters
def fsdp_train(rank, world, steps, count_ns=False, placement=None, optimizer=None):
    """The same parameters and gradients as :func:`train`, as ``Shard(0)`` DTensors."""
    import treeopt.rules.muon as muon_rule
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    calls = []
    if count_ns:
        original = muon_rule.newton_schulz
        muon_rule.newton_schulz = lambda x, *rest: calls.append(tuple(x.shape)) or original(x, *rest)
    mesh = init_device_mesh("cpu", (world,))

    def placements(tensor):  # Shard(0), or ``placement`` for the matrices
        return [placement if placement is not None and tensor.ndim == 2 else Shard(0)]

    params = [(n, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, placements(p)))) for n, p in make_params()]
    opt = treeopt.torch.Optimizer(params, optimizer or muon_adamw())
    for step in range(steps):
        for (name, p), g in zip(params, gradients(step).values()):
            p.grad = distribute_tensor(g, mesh, placements(g))
        opt.step()
    tensors = opt.state_dict()["tensors"]
    return {
        "params": {n: p.full_tensor() for n, p in params},
        "codes": held_slots(opt),
        "ns_calls": calls,
        "slots": {
            k: (type(v).__name__, tuple(v.placements) if isinstance(v, DTensor) else None)
            for k, v in tensors.items()
            if "/" in k and not k.startswith("@")
        },
        "collectives": opt._distributed.comm.calls,
    }


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_parameters_equal_one_process_and_gather_each_matrix_once(world, reference):
    from torch.distributed.tensor import Shard

    results = run_world(fsdp_train, world, 3, True)
    assert_same_params(results, reference)
    assert sum(len(r["ns_calls"]) for r in results) == 3 * len(MUON_MATRICES)  # once per matrix, on its owner
    assert all(set(r["ns_calls"]) <= {SHAPES[n] for n in MUON_MATRICES} for r in results)  # whole matrices only
    slots = results[0]["slots"]
    assert slots["embed.weight/m"] == ("DTensor", (Shard(0),)) and slots["blocks.0.attn.weight/v"][0] == "DTensor"
    assert all(r["collectives"] == results[0]["collectives"] for r in results)


def test_fsdp2_unsupported_placements_and_rules_raise_with_the_path():
    from torch.distributed.tensor import Shard

    def shard1(rank, world):
        try:
            fsdp_train(rank, world, 1, placement=Shard(1))
        except Exception as error:
            return str(error)

    def adafactor(rank, world):
        try:
            fsdp_train(
                rank, world, 1, optimizer=optim.MultiOptimizer([optim.Muon(0.02), optim.Adafactor()], [hidden_matrix])
            )
        except Exception as error:
            return str(error)

    message = run_world(shard1, 2)[0]
    assert "blocks.0.attn.weight" in message and "Shard(dim=1)" in message
    message = run_world(adafactor, 2)[0]
    # a bias's Adafactor state is split by rows with it (gathered whole to one owner); the
    # embedding's row and column sums cannot be
    assert "Adafactor needs whole matrices" in message and "'embed.weight'" in message
    assert "cannot be split by rows" in message


def test_an_optimizer_built_before_fully_shard_raises_at_its_first_step():
    def run(rank, world):
        from torch.distributed.fsdp import fully_shard

        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        opt = treeopt.torch.Optimizer(model, optim.AdamW(1e-3), sharding="replicated")
        fully_shard(model)
        model(torch.ones(2, 8)).sum().backward()
        try:
            opt.step()
        except RuntimeError as error:
            return str(error)

    assert "before fully_shard" in run_world(run, 2)[0]


def fsdp_checkpoint_phase(rank, world, folder, phase, mode):
    """DCP save after 2 steps or load and take 1 more, with DTensor parameters ("fsdp") or
    plain ones under ZeRO-1 ("zero1"): the same keys, so either loads the other."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    params = make_params()
    if mode == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        params = [(n, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))) for n, p in params]
    opt = treeopt.torch.Optimizer(params, muon_adamw(), sharding="zero1" if mode == "zero1" else None)
    model = {n: p.detach() for n, p in params}
    steps = range(2)
    if phase == "load":
        dcp.load({"model": model, "optim": opt}, checkpoint_id=folder)
        steps = range(2, 3)
    for step in steps:
        for (name, p), g in zip(params, gradients(step).values()):
            p.grad = distribute_tensor(g, mesh, [Shard(0)]) if mode == "fsdp" else g
        opt.step()
    if phase == "save":
        dcp.save({"model": model, "optim": opt}, checkpoint_id=folder)
    return {"params": {n: p.full_tensor() if mode == "fsdp" else p.detach().clone() for n, p in params}}


@pytest.mark.parametrize("saved, loaded", [((2, "fsdp"), (4, "fsdp")), ((4, "fsdp"), (2, "zero1"))])
def test_fsdp2_checkpoint_reshards_to_another_world_size_and_mode(saved, loaded, reference, tmp_path):
    run_world(fsdp_checkpoint_phase, saved[0], str(tmp_path), "save", saved[1])
    after = run_world(fsdp_checkpoint_phase, loaded[0], str(tmp_path), "load", loaded[1])
    assert_same_params(after, reference)


def fully_shard_train(rank, world, steps):
    """A real ``fully_shard`` model: forward, backward, step; returns the full gradients each
    step gave (to replay in one process) and the final parameters."""
    from torch.distributed.fsdp import fully_shard

    model = Net()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = treeopt.torch.Optimizer(model, muon_adamw())
    generator = torch.Generator().manual_seed(rank)
    seen = []
    for _ in range(steps):
        tokens = torch.randint(0, 10, (4, 6), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), ((tokens + 1) % 10).flatten())
        loss.backward()
        seen.append({n: p.grad.full_tensor() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    return {"params": {n: p.full_tensor() for n, p in model.named_parameters()}, "grads": seen}


def test_a_fully_sharded_model_trains_as_one_process_fed_its_gradients():
    results = run_world(fully_shard_train, 2, 3)
    expected = run_world(replay, 1, results[0]["grads"])[0]
    assert_same_params(results, expected)


# ---------------------------------------------------------------------------------- compact state (state_dtype)
COMPACT = {
    # int8: blocks are pieces of rows, so a row split keeps them whole; judged by the whole
    # tensor's size (embed.weight, 1024 elements, is int8 though a shard of it is smaller)
    "int8": optim.StatePrecision("int8", min_size=1000),
    # bfloat16: each element's random bits come from its index in the whole tensor
    "bfloat16": optim.StatePrecision("bfloat16", seed=7),
}


def compact_muon_adamw(state_dtype):
    precision = COMPACT[state_dtype]
    return optim.MultiOptimizer(
        [optim.Muon(0.02, weight_decay=0.01, state_dtype=precision), optim.AdamW(3e-3, state_dtype=precision)],
        [hidden_matrix],
    )


def held_slots(opt):
    """Every slot array this rank holds, by ``path/slot`` (its rows, when split)."""
    return {
        f"{'.'.join(map(str, keys))}/{slot}": value.detach().clone()
        for member in opt.optimizer.groups()
        for keys, slots in member.group.store.items()
        for slot, value in slots.items()
    }


def compact_train(rank, world, steps, sharding, state_dtype):
    params = make_params()
    opt = treeopt.torch.Optimizer(params, compact_muon_adamw(state_dtype), sharding=sharding if world > 1 else None)
    take_steps(opt, params, range(steps))
    return {
        "params": {n: p.detach().clone() for n, p in params},
        "codes": held_slots(opt),
        "split": [n for n, v in opt._distributed.local.items() if v.shape != dict(params)[n].shape]
        if world > 1
        else [],
    }


def assert_same_slots(results, one):
    """Each rank holds one process's slots, whole or its rows of them, byte for byte."""
    for key, value in one["codes"].items():
        held = [r["codes"][key] for r in results if key in r["codes"]]
        assert held, key
        if all(h.shape == value.shape for h in held):
            assert all(torch.equal(h.view(torch.uint8), value.view(torch.uint8)) for h in held), key
        else:  # split by rows: the ranks' pieces are one process's rows, in order
            assert torch.equal(torch.cat(held).view(torch.uint8), value.view(torch.uint8)), key


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
@pytest.mark.parametrize("world", [2, 4])
def test_zero1_compact_state_is_one_process_bit_for_bit(world, state_dtype):
    (one,) = run_world(compact_train, 1, 3, None, state_dtype)
    if state_dtype == "int8":
        assert one["codes"]["embed.weight/m"].dtype == torch.int8
        assert one["codes"]["embed.weight/m_scale"].shape == (64, 1)
    else:
        assert one["codes"]["embed.weight/m"].dtype == torch.bfloat16
    results = run_world(compact_train, world, 3, "zero1", state_dtype)
    assert any(r["split"] for r in results)  # some parameter is split by rows
    assert_same_params(results, one)
    assert_same_slots(results, one)


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_fsdp2_compact_state_is_one_process_bit_for_bit(state_dtype):
    (one,) = run_world(compact_train, 1, 3, None, state_dtype)
    results = run_world(fsdp_train, 2, 3, False, None, compact_muon_adamw(state_dtype))
    assert_same_params(results, one)
    assert_same_slots(results, one)


def compact_dcp_phase(rank, world, folder, phase, calls, state_dtype):
    """As :func:`dcp_phase`, with compact state: codes and scales saved as ``Shard(0)`` pieces
    of their rows and resharded by DCP."""
    import torch.distributed.checkpoint as dcp

    params = make_params()
    model = {n: p.detach() for n, p in params}
    opt = treeopt.torch.Optimizer(params, compact_muon_adamw(state_dtype), sharding="zero1")
    first = 0
    if phase == "load":
        dcp.load({"model": model, "optim": opt}, checkpoint_id=folder)
        first = int(opt.optimizer.optimizers[1].step)
    take_steps(opt, params, range(first, first + calls))
    if phase == "save":
        dcp.save({"model": model, "optim": opt}, checkpoint_id=folder)
    return {"params": {n: p.detach().clone() for n, p in params}, "codes": held_slots(opt)}


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_dcp_checkpoint_of_compact_state_resumes_at_another_world_size(state_dtype, tmp_path):
    (uninterrupted,) = run_world(compact_dcp_phase, 1, None, "none", 5, state_dtype)
    run_world(compact_dcp_phase, 2, str(tmp_path), "save", 3, state_dtype)
    after = run_world(compact_dcp_phase, 1, str(tmp_path), "load", 2, state_dtype)
    assert_same_params(after, uninterrupted)
    assert_same_slots(after, uninterrupted)


# ---------------------------------------------------------------------------------- Muon's variants
def variants_optimizer(normuon="output"):
    """Muon with every variant (NorMuon's slot has one value per neuron), and AdamW."""
    muon = optim.Muon(
        0.02,
        weight_decay=0.1,
        decoupled_weight_decay=True,
        cautious_weight_decay=True,
        normuon=normuon,
        ns_coefficients="polar_express",
        row_equilibration=True,
        renormalization=True,
    )
    return optim.MultiOptimizer([muon, optim.AdamW(3e-3)], [hidden_matrix])


def variants_train(rank, world, steps, sharding):
    params = make_params()
    opt = treeopt.torch.Optimizer(params, variants_optimizer(), sharding=sharding if world > 1 else None)
    take_steps(opt, params, range(steps))
    return {"params": {n: p.detach().clone() for n, p in params}}


@pytest.mark.parametrize("world", [2, 4])
def test_muon_variants_under_zero1_and_fsdp2_are_bit_identical_to_one_process(world):
    one = run_world(variants_train, 1, 3, None)[0]
    assert_same_params(run_world(variants_train, world, 3, "zero1"), one)
    # FSDP2: NorMuon's second moments travel with their rows to each matrix's owner and back
    results = run_world(fsdp_train, world, 3, False, None, variants_optimizer())
    assert_same_params(results, one)
    assert results[0]["slots"]["blocks.0.attn.weight/second_moment"][0] == "DTensor"


def test_fsdp2_refuses_a_normuon_moment_that_is_not_split_by_rows():
    def larger(rank, world):
        try:
            fsdp_train(rank, world, 1, optimizer=variants_optimizer(normuon="larger"))
        except Exception as error:
            return str(error)

    message = run_world(larger, 2)[0]
    # (96, 64): 48 rows a rank are wider than long, so "larger" would pick columns there
    assert "blocks.0.attn.weight" in message and "cannot be split by rows" in message
