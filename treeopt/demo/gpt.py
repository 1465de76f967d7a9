"""A small byte-level GPT in PyTorch: the model the demo trains.

Pre-norm blocks (LayerNorm, causal self-attention, LayerNorm, GELU MLP), learned token and
position embeddings, an untied output head. The parameter names are what routing sees:
``tok_embed.weight``, ``blocks.0.attn.qkv.weight``, ``blocks.0.ln1.bias``, ``head.weight``...
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Config:
    vocab: int = 256  # bytes
    context: int = 64
    width: int = 128
    layers: int = 4
    heads: int = 4


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.proj = nn.Linear(config.width, config.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).view(batch, time, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time, width))


class MLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.width, 4 * config.width, bias=False)
        self.proj = nn.Linear(4 * config.width, config.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.width)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.width)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config: Config = Config()) -> None:
        super().__init__()
        self.config = config
        self.tok_embed = nn.Embedding(config.vocab, config.width)
        self.pos_embed = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab, bias=False)

    def reset_parameters(self, seed: int) -> GPT:
        """GPT-2's initialisation from ``seed``: normal(0, 0.02) matrices, the projections
        into the residual stream scaled by 1/sqrt(2 * layers), LayerNorms at (1, 0)."""
        generator = torch.Generator().manual_seed(seed)
        residual = 0.02 / math.sqrt(2 * self.config.layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 2:
                    p.normal_(0.0, residual if name.endswith("proj.weight") else 0.02, generator=generator)
                else:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_embed(tokens) + self.pos_embed(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in nats per byte."""
        logits = self(tokens)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def build(seed: int, config: Config = Config()) -> GPT:
    """A GPT with ``seed``'s initial weights (the same for every run on that seed)."""
    return GPT(config).reset_parameters(seed)
