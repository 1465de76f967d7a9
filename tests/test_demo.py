"""The demo, the project's main job: the GPT's three runs (``python -m treeopt.demo``) and the
NumPy digits MLP (``python -m treeopt.demo digits``)."""

import gzip
import importlib.util
import json
import math
import pathlib
import warnings

import numpy as np
import pytest

from treeopt.demo import check_gradients, digits, model, training

torch = pytest.importorskip("torch", reason="the GPT demo is written in PyTorch (the demo extra)")
pytest.importorskip("matplotlib", reason="the demo plots with matplotlib (the demo extra)")

from treeopt.demo import cli, gpt, setups, text  # noqa: E402
from treeopt.demo.training_gpt import Curve  # noqa: E402
from treeopt.multi import RoutingWarning  # noqa: E402


# ------------------------------------------------------------------------------ the GPT demo
def test_quick_demo_writes_the_table_the_plot_and_the_json(tmp_path, capsys):
    out = tmp_path / "out"
    returned = cli.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    assert record == json.loads(json.dumps(returned))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    runs = record["runs"]
    assert list(runs) == ["AdamW (tuned)", "Muon everywhere (naive)", "muon_adamw (routed)"]
    steps = record["settings"]["steps"]
    assert steps == cli.QUICK_STEPS and record["settings"]["parameters"] == 862_464
    assert set(record["versions"]) >= {"python", "torch", "treeopt", "numpy", "processor"}
    uniform = math.log(256)  # a uniform guess over the bytes
    for run in runs.values():
        curve = run["curve"]
        assert curve["step"][0] == 0 and curve["step"][-1] == steps
        assert curve["val_loss"][0] == pytest.approx(uniform, abs=0.1)  # every run starts from the same weights
        assert run["final_val_loss"] == curve["val_loss"][-1] < uniform - 2
        assert curve["seconds"] == sorted(curve["seconds"])
    first = [run["curve"]["val_loss"][0] for run in runs.values()]
    assert first[0] == first[1] == first[2]
    adamw, naive, routed = runs.values()
    assert record["target_val_loss"] == adamw["final_val_loss"]
    assert adamw["steps_ratio"] == pytest.approx(1.0, abs=1e-9)  # the target is its own final loss
    # the story, even at --quick's length: routing beats both, and reaches AdamW's loss early
    assert routed["final_val_loss"] < adamw["final_val_loss"] and routed["final_val_loss"] < naive["final_val_loss"]
    assert 0 < routed["steps_ratio"] < 1 and routed["steps_to_target"] < steps
    # what the user sees: the plan once, the naive run's guard warnings, the table
    assert printed.count("Routing plan at step") == 1
    assert "Muon got what looks like an embedding" in printed and "output head" in printed
    assert "steps to target" in printed and "loss.png" in printed and "Muon everywhere (naive) ended at" in printed
    plan = {row["path"]: row["optimizer"] for row in record["plan"]["parameters"]}
    assert plan["blocks.0.attn.qkv.weight"] == "muon" and plan["tok_embed.weight"] == "adamw"


def test_demo_stops_and_resumes_from_a_checkpoint_exactly(tmp_path):
    straight = cli.main(["--steps", "6", "--seed", "3", "--out", str(tmp_path / "a")])
    folder = str(tmp_path / "checkpoint")
    assert (
        cli.main(
            ["--steps", "6", "--seed", "3", "--checkpoint", folder, "--stop-after", "2", "--out", str(tmp_path / "b")]
        )
        is None
    )
    resumed = cli.main(["--steps", "6", "--seed", "3", "--checkpoint", folder, "--out", str(tmp_path / "b")])
    for name, run in straight["runs"].items():
        assert resumed["runs"][name]["curve"]["val_loss"] == run["curve"]["val_loss"]
        assert resumed["runs"][name]["curve"]["step"] == run["curve"]["step"]


def test_other_frameworks_are_refused_with_a_pointer_to_what_exists(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--framework", "jax"])
    assert "treeopt.demo digits" in capsys.readouterr().err


def test_the_three_setups_route_as_their_names_say():
    model = gpt.build(0)
    params = dict(model.named_parameters())
    routed = setups.make("muon_adamw", model, steps=10).optimizer
    names = {path: routed.names[routed.route(path)] for path in params}
    assert names["blocks.2.mlp.fc.weight"] == names["blocks.0.attn.proj.weight"] == "muon"
    assert names["tok_embed.weight"] == names["pos_embed.weight"] == names["head.weight"] == "adamw"
    assert names["blocks.0.ln1.weight"] == names["ln_f.bias"] == "adamw_no_decay"

    with pytest.warns(RoutingWarning) as caught:
        naive = setups.make("Muon everywhere", model, steps=10).optimizer
    warned = " ".join(str(w.message) for w in caught)
    assert "tok_embed.weight" in warned and "head.weight" in warned
    assert all(naive.route(path) == 0 for path, p in params.items() if p.ndim == 2)

    adamw = setups.make("AdamW", model, steps=10).optimizer
    assert {adamw.names[adamw.route(path)] for path in params} == {"adamw", "adamw_no_decay"}
    assert adamw.optimizers[0].weight_decay == setups.Hyper().weight_decay
    assert adamw.optimizers[1].weight_decay == 0


def _outcome_sweep():
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "outcome.py"
    spec = importlib.util.spec_from_file_location("outcome_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sweep_resumes_records_written_before_muon_had_its_own_weight_decay(tmp_path):
    outcome = _outcome_sweep()
    old = {"adamw_lr": 5e-3, "beta2": 0.99, "weight_decay": 0.1, "muon_lr": 0.02, "warmup": 0.2, "max_grad_norm": 1.0}
    records = [
        {"setup": "AdamW", "hyper": old, "seed": 0, "steps": 600, "final_val_loss": 1.72},
        {"setup": "muon_adamw", "hyper": old, "seed": 0, "steps": 600, "final_val_loss": 1.44},
        # lower, but not at AdamW's best settings: part 2 does not pick it
        {"setup": "muon_adamw", "hyper": {**old, "adamw_lr": 3e-3}, "seed": 0, "steps": 600, "final_val_loss": 1.43},
    ]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    now = {
        **setups.Hyper().to_dict(),
        **{"adamw_lr": 5e-3, "beta2": 0.99, "warmup": 0.2, "muon_lr": 0.04, "muon_weight_decay": 0.0},
    }
    done = {outcome.key(r) for r in outcome.load(results)}
    # AdamW alone does not read Muon's settings: its old run counts whatever they are now
    assert outcome.key({"setup": "AdamW", "hyper": now, "seed": 0, "steps": 600}) in done
    # the old muon_adamw decayed Muon by AdamW's weight decay and warmed it up with AdamW's
    # warm-up: it is that run, and no other
    assert (
        outcome.key(
            {
                "setup": "muon_adamw",
                "hyper": {**now, "muon_lr": 0.02, "muon_weight_decay": 0.1},
                "seed": 0,
                "steps": 600,
            }
        )
        in done
    )
    assert outcome.key({"setup": "muon_adamw", "hyper": {**now, "muon_lr": 0.02}, "seed": 0, "steps": 600}) not in done
    table = outcome.table(outcome.load(results), 600, [0])
    assert "| AdamW | - | - | - | 0.005 | 0.99 | 0.2 | **1.7200 (1.720)** |" in table
    assert "| muon_adamw | 0.02 | 0.1 | 0.2 | 0.005 | 0.99 | 0.2 | **1.4400 (1.440)** |" in table
    assert "| muon_adamw | 0.02 | 0.1 | 0.2 | 0.003 | 0.99 | 0.2 | 1.4300 (1.430) |" in table


def test_the_sweep_walks_a_rate_until_the_best_is_bracketed(tmp_path, monkeypatch):
    outcome = _outcome_sweep()
    results = tmp_path / "results.jsonl"
    ran = []

    def fake_sweep(jobs, path, workers):  # a loss with its minimum at Muon lr 0.06 and warm-up 0.05
        done = {outcome.key(r) for r in outcome.load(path)}
        with open(path, "a") as f:
            for job in jobs:
                if outcome.key(job) not in done:
                    h = job["hyper"]
                    loss = 1.4 + abs(math.log(h["muon_lr"] / 0.06)) + abs(h["muon_warmup"] - 0.05)
                    ran.append((h["muon_lr"], h["muon_warmup"]))
                    f.write(json.dumps({**job, "final_val_loss": loss}) + "\n")

    monkeypatch.setattr(outcome, "sweep", fake_sweep)
    args = outcome.argparse.Namespace(steps=600, seeds=[0, 1], results=results, jobs=1)
    start = {**setups.Hyper().to_dict(), "muon_lr": 0.02, "muon_warmup": 0.2}
    warmed, _ = outcome.descend(args, "muon_adamw", start, "muon_warmup", (0.05, 0.1, 0.2), {}, keep=("muon_lr",))
    assert warmed["muon_warmup"] == 0.05 and warmed["muon_lr"] == 0.02
    best, loss = outcome.descend(
        args, "muon_adamw", warmed, "muon_lr", (0.01, 0.02, 0.04, 0.06, 0.08), {}, keep=("muon_warmup",)
    )
    assert best["muon_lr"] == 0.06 and loss == pytest.approx(1.4)
    # the rate walked up from 0.02 one neighbour at a time, and stopped once 0.06 was bracketed
    assert sorted({lr for lr, w in ran if w == 0.05}) == [0.01, 0.02, 0.04, 0.06, 0.08]
    assert len(ran) == 2 * 7  # three warm-ups, then four more rates, each on both seeds


def test_the_learning_rate_warms_up_then_decays_to_zero():
    lr = setups.warmup_cosine(0.5, 100, 0.2)
    assert lr(0) == 0 and lr(10) == pytest.approx(0.25)
    assert lr(20) == pytest.approx(0.5) and lr(100) == pytest.approx(0.0, abs=1e-9)
    assert all(lr(s) >= lr(s + 1) for s in range(20, 100))
    cold = setups.warmup_cosine(0.5, 100, 0.0)  # no warm-up: the cosine from the first step
    assert (
        cold(0) == pytest.approx(0.5) and cold(50) == pytest.approx(0.25) and cold(100) == pytest.approx(0.0, abs=1e-9)
    )


@pytest.mark.parametrize("setup", ["muon_adamw", "Muon everywhere"])
def test_each_group_warms_up_on_its_own_schedule(setup):
    # Muon without warm-up, AdamW with one: at the first step only Muon's parameters move
    model = gpt.build(0)
    hyper = setups.Hyper(warmup=0.2, muon_warmup=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoutingWarning)
        optimizer = setups.make(setup, model, steps=10, hyper=hyper)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    inputs = torch.randint(0, 256, (2, 8))
    model.loss(inputs, inputs).backward()
    optimizer.step()
    routing = optimizer.optimizer
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    muon = {name for name in before if routing.names[routing.route(name)] == "muon"}
    assert moved == muon and "blocks.0.attn.qkv.weight" in moved
    assert [float(lr) for lr in routing.learning_rate][0] == pytest.approx(hyper.muon_lr, rel=0.05)
    assert all(float(lr) < hyper.adamw_lr / 2 for lr in routing.learning_rate[1:])


def test_the_demo_says_what_the_naive_run_cost():
    def curve(losses):
        c = Curve()
        for step, loss in zip(range(0, 100, 25), losses):
            c.add(step, 0.0, 0.0, loss, float("nan"))
        return c

    routed = curve([5.5, 2.6, 2.0, 1.44])
    close = cli.naive_versus_routed(curve([5.5, 3.6, 2.1, 1.45]), routed)
    assert "ended at 1.4500, +0.010 nats/byte from muon_adamw's 1.4400" in close
    assert "widest gap was +1.000, at step 25" in close and "only slightly worse" in close
    assert "about the same" in cli.naive_versus_routed(curve([5.5, 3.6, 2.1, 1.445]), routed)
    apart = cli.naive_versus_routed(curve([5.5, 3.6, 2.1, 1.60]), routed)
    assert "+0.160" in apart and "slightly" not in apart and "about the same" not in apart


def test_curve_reach_interpolates_between_evaluations():
    curve = Curve()
    for step, seconds, loss in ((0, 0.0, 5.0), (10, 2.0, 3.0), (20, 4.0, 2.0)):
        curve.add(step, seconds, seconds / 2, loss, float("nan"))
    assert curve.reach(2.5) == pytest.approx((15.0, 3.0, 1.5))
    assert curve.reach(3.0) == (10, 2.0, 1.0)
    assert curve.reach(6.0) == (0.0, 0.0, 0.0) and curve.reach(1.9) is None


def test_shipped_text_is_the_stdlib_with_whole_modules_held_out():
    modules = text.load_modules()
    assert len(modules) > 150 and b"def " in modules["argparse.py"]
    train, validation = text.train_validation()
    assert len(validation) > 100_000 and len(train) > 10 * len(validation)
    held_out = [m for i, m in enumerate(modules.values()) if i % text.VALIDATION_EVERY == text.VALIDATION_EVERY // 2]
    assert bytes(validation) == b"".join(held_out) and bytes(held_out[0][:200]) not in bytes(train)
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in (text.DATA / "PYTHON-LICENSE.txt").read_text()
    assert gzip.decompress(text.ARCHIVE.read_bytes()).startswith(text.SEPARATOR)


def test_text_build_writes_the_same_archive_from_the_same_sources(tmp_path):
    lib = tmp_path / "Lib"
    lib.mkdir()
    for name, source in (("b.py", b"x = 1\n"), ("a.py", b"y = 2\n"), ("_sysconfigdata_x.py", b"z\n")):
        (lib / name).write_bytes(source)
    assert text.build(lib, tmp_path / "one.gz") == 2
    text.build(lib, tmp_path / "two.gz")
    assert (tmp_path / "one.gz").read_bytes() == (tmp_path / "two.gz").read_bytes()
    assert text.load_modules(tmp_path / "one.gz") == {"a.py": b"y = 2\n", "b.py": b"x = 1\n"}


# ------------------------------------------------------------------------ the NumPy digits demo
def test_backward_pass_matches_finite_differences():
    errors = check_gradients()
    assert set(errors) >= {"embed.weight", "layers.0.weight", "head.bias"}
    assert max(errors.values()) < 1e-6


def test_digits_routing_sends_hidden_matrices_to_muon_and_biases_to_undecayed_adamw():
    params = model.init_mlp(model.DEFAULT_SIZES, 0)
    multi, _ = training.muon_adamw(steps=10)
    multi.init(params)
    assert multi.route("layers.0.weight") == 0 and multi.route("layers.1.weight") == 0
    assert multi.route("layers.0.bias") == 1 and multi.route("head.bias") == 1
    assert multi.route("embed.weight") == 2 and multi.route("head.weight") == 2
    assert multi.optimizers[1].weight_decay == 0.0


def test_quick_digits_demo_trains_both_runs(capsys):
    runs = cli.main(["digits", "--quick", "--seed", "1"])
    out = capsys.readouterr().out
    assert "layers.0.weight" in out and "Muon" in out
    initial = float(np.log(10))  # cross-entropy of a uniform guess
    for run in runs.values():
        assert np.isfinite(run.train_loss) and run.train_loss < 0.6 * initial
        assert run.test_accuracy > 0.5


def test_digits_demo_stops_and_resumes_from_a_checkpoint_exactly(tmp_path):
    folder = str(tmp_path / "checkpoint")
    straight = digits.main(["--steps", "12", "--seed", "2"])
    digits.main(["--steps", "12", "--seed", "2", "--stop-after", "5", "--checkpoint", folder])
    resumed = digits.main(["--steps", "12", "--seed", "2", "--checkpoint", folder])
    for name, run in straight.items():
        assert resumed[name].steps == 12
        assert resumed[name].train_loss == run.train_loss and resumed[name].test_loss == run.test_loss
