"""The demo, the project's main job, runs and trains."""

import numpy as np

from treeopt.demo import check_gradients, main, model, training


def test_backward_pass_matches_finite_differences():
    errors = check_gradients()
    assert set(errors) >= {"embed.weight", "layers.0.weight", "head.bias"}
    assert max(errors.values()) < 1e-6


def test_routing_sends_hidden_matrices_to_muon_and_biases_to_undecayed_adamw():
    params = model.init_mlp(model.DEFAULT_SIZES, 0)
    multi, _ = training.muon_adamw(steps=10)
    multi.init(params)
    assert multi.route("layers.0.weight") == 0 and multi.route("layers.1.weight") == 0
    assert multi.route("layers.0.bias") == 1 and multi.route("head.bias") == 1
    assert multi.route("embed.weight") == 2 and multi.route("head.weight") == 2
    assert multi.optimizers[1].weight_decay == 0.0


def test_quick_demo_trains_both_runs(capsys):
    runs = main(["--quick", "--seed", "1"])
    out = capsys.readouterr().out
    assert "layers.0.weight" in out and "Muon" in out
    initial = float(np.log(10))  # cross-entropy of a uniform guess
    for run in runs.values():
        assert np.isfinite(run.train_loss) and run.train_loss < 0.6 * initial
        assert run.test_accuracy > 0.5


def test_demo_stops_and_resumes_from_a_checkpoint_exactly(tmp_path):
    folder = str(tmp_path / "checkpoint")
    straight = main(["--steps", "12", "--seed", "2"])
    main(["--steps", "12", "--seed", "2", "--stop-after", "5", "--checkpoint", folder])
    resumed = main(["--steps", "12", "--seed", "2", "--checkpoint", folder])
    for name, run in straight.items():
        assert resumed[name].steps == 12
        assert resumed[name].train_loss == run.train_loss and resumed[name].test_loss == run.test_loss
