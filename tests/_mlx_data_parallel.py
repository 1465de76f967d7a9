"""One rank of the MLX data-parallel check (tests/test_mlx_distributed.py starts two with
``mlx.launch --backend ring``): each rank takes its own batch, averages the gradients with
``nn.average_gradients`` and steps treeopt's Muon+AdamW. It saves, per step, the averaged
gradients and the parameters after the step, so the test can compare the ranks with each
other and with one process fed the same averaged gradients.

    python tests/_mlx_data_parallel.py OUT_DIR STEPS
"""

import sys


def model_and_optimizer():
    """The model (seeded) and optimizer every rank, and the one-process replay, start from."""
    import mlx.core as mx
    import mlx.nn as nn

    import treeopt as optim

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(12, 32)
            self.hidden = nn.Linear(32, 32)
            self.head = nn.Linear(32, 3)

        def __call__(self, x):
            return self.head(nn.gelu(self.hidden(nn.gelu(self.embed(x)))))

    mx.random.seed(0)
    model = MLP()
    optimizer = optim.MultiOptimizer(
        [optim.Muon(0.02, weight_decay=0.01), optim.AdamW(optim.cosine_decay(3e-3, 10))],
        [lambda path, w: path == "hidden.weight"],
    )
    return model, optimizer


def batch(rank, step):
    """Rank ``rank``'s batch at ``step``: different on every rank."""
    import mlx.core as mx

    key = mx.random.key(1000 * step + rank)
    x = mx.random.normal((16, 12), key=key)
    return x, (x[:, :3].sum(-1) > 0).astype(mx.int32) + (x[:, 3] > 1).astype(mx.int32)


def main(out_dir, steps):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    group = mx.distributed.init(strict=True, backend="ring")
    rank = group.rank()
    model, optimizer = model_and_optimizer()

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    saved = {}
    for step in range(steps):
        _, grads = loss_and_grad(model, *batch(rank, step))
        grads = nn.average_gradients(grads, group=group)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        saved.update({f"grad/{step}/{k}": v for k, v in tree_flatten(grads)})
        saved.update({f"param/{step}/{k}": v for k, v in tree_flatten(model.parameters())})
    saved["world"] = mx.array(group.size())
    mx.savez(f"{out_dir}/rank{rank}.npz", **saved)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # leave together


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
