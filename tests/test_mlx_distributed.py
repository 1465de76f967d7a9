"""treeopt under MLX data parallelism: ``mx.distributed`` + ``nn.average_gradients``.

Two processes on localhost, started by ``mlx.launch --backend ring`` (tests/_mlx_data_parallel.py
is one rank), must end with the same parameters bit for bit, equal to one process that
steps the same optimizer with the averaged gradients. The group of one (no launcher) is the
path every single-process MLX script takes.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="MLX tests need mlx")
nn = pytest.importorskip("mlx.nn")
from mlx.utils import tree_flatten, tree_map  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import _mlx_data_parallel as worker  # noqa: E402

STEPS = 3


def launcher():
    """The ``mlx.launch`` script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "mlx.launch"
    return str(beside) if beside.exists() else shutil.which("mlx.launch")


def free_ports(count):
    """A first port such that ``count`` consecutive ports are free now (ring: one per rank)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            taken = []
            for port in range(first, first + count):
                s = socket.socket()
                taken.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in taken:
                s.close()
    pytest.skip("no free consecutive ports on localhost")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """``[rank0, rank1]``: what each rank saved (averaged gradients, parameters per step)."""
    if not mx.distributed.is_available():
        pytest.skip("this MLX build has no distributed backend")
    launch = launcher()
    if launch is None:
        pytest.skip("mlx.launch is not installed beside this Python")
    out = tmp_path_factory.mktemp("mlx_ring")
    command = [
        launch,
        "-n",
        "2",
        "--backend",
        "ring",
        "--starting-port",
        str(free_ports(2)),
        "--python",
        sys.executable,
        str(Path(worker.__file__)),
        str(out),
        str(STEPS),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])),
    }
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=90, env=env)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"mlx.launch did not finish in {timeout.timeout} s")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [dict(mx.load(str(out / f"rank{rank}.npz"))) for rank in range(2)]


def parameters_at(saved, step):
    prefix = f"param/{step}/"
    return {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}


def test_ranks_end_with_identical_parameters(two_ranks):
    rank0, rank1 = two_ranks
    assert rank0["world"].item() == rank1["world"].item() == 2
    assert rank0.keys() == rank1.keys()
    for key in rank0:  # averaged gradients and parameters, every step, bit for bit
        assert mx.array_equal(rank0[key], rank1[key]).item(), key
    first, last = parameters_at(rank0, 0), parameters_at(rank0, STEPS - 1)
    assert not mx.array_equal(first["hidden.weight"], last["hidden.weight"]).item()  # it trained


def test_one_process_with_the_averaged_gradients_gives_the_same_parameters(two_ranks):
    rank0 = two_ranks[0]
    model, optimizer = worker.model_and_optimizer()
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
    for step in range(STEPS):
        # the mean of both ranks' gradients, computed here: (g0 + g1) / 2, as all_sum / 2 does for two ranks
        local = [loss_and_grad(model, *worker.batch(rank, step))[1] for rank in range(2)]
        averaged = tree_map(lambda a, b: (a + b) / 2, *local)
        for key, value in tree_flatten(averaged):
            assert mx.array_equal(value, rank0[f"grad/{step}/{key}"]).item(), (step, key)
        optimizer.update(model, averaged)
        mx.eval(model.parameters(), optimizer.state)
        for key, value in tree_flatten(model.parameters()):
            np.testing.assert_array_equal(
                np.array(value), np.array(rank0[f"param/{step}/{key}"]), err_msg=f"step {step}, {key}"
            )


def test_a_group_of_one_is_a_plain_step():
    group = mx.distributed.init()  # no launcher: the singleton group every MLX script has
    assert group.size() == 1 and group.rank() == 0
    model, optimizer = worker.model_and_optimizer()
    reference, reference_optimizer = worker.model_and_optimizer()
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
    for step in range(2):
        grads = loss_and_grad(model, *worker.batch(0, step))[1]
        averaged = nn.average_gradients(grads, group=group)
        for (key, a), (_, b) in zip(tree_flatten(averaged), tree_flatten(grads)):
            assert mx.array_equal(a, b).item(), key
        optimizer.update(model, averaged)
        reference_optimizer.update(reference, grads)
    for (key, a), (_, b) in zip(tree_flatten(model.parameters()), tree_flatten(reference.parameters())):
        assert mx.array_equal(a, b).item(), key
    assert optimizer.step.item() == 2
