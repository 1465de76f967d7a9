"""Random torch trees for the tests of the torch runners (test_torch_compiled, test_cuda)."""

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
