"""Shared by the torch tests (test_torch, test_torch_compiled, test_cuda): random trees of
tensors, and a tiny language model with its training loop."""

import numpy as np
import torch


def random_tree(shapes, seed, dtype=torch.float32, device="cpu"):
    """``shapes`` (dicts and lists of shape tuples) filled with standard normal values."""
    rng = np.random.default_rng(seed)

    def build(node):
        if isinstance(node, tuple):
            return torch.from_numpy(rng.standard_normal(node)).to(device=device, dtype=dtype)
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        return [build(v) for v in node]

    return build(shapes)


def leaves(node):
    """The tensors of a tree, in order."""
    if isinstance(node, dict):
        return [x for v in node.values() for x in leaves(v)]
    if isinstance(node, list):
        return [x for v in node for x in leaves(v)]
    return [node]


class Net(torch.nn.Module):
    def __init__(self, tied=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 10, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return self.head(self.norm(x))


TOKENS = torch.arange(10).repeat(4, 1)
TARGETS = (TOKENS + 1) % 10


def train(model, opt, steps):
    device = next(model.parameters()).device
    tokens, targets = TOKENS.to(device), TARGETS.to(device)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 10), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
