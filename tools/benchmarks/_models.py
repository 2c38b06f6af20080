"""Small models and data shared by the benchmark sections.

``TinyGPT`` is a decoder-only transformer language model (pre-norm blocks, causal
``scaled_dot_product_attention``, tied input/output embeddings) written with plain ``nn`` modules
so that ``functrain.functionalize``, ``torch.func`` and ``torch.compile`` all see ordinary code.
``gpt_config(quick)`` gives the benchmark's sizes: about 3.2M parameters in full mode, a toy in
quick mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of :class:`TinyGPT` and of its benchmark batches."""

    vocab: int = 256
    dim: int = 256
    layers: int = 4
    heads: int = 4
    seq: int = 32
    batch: int = 8
    micro_batches: int = 4


def gpt_config(quick: bool) -> GPTConfig:
    """The benchmark's model: ~3.2M parameters (full) or a toy (quick)."""
    if quick:
        return GPTConfig(vocab=64, dim=32, layers=2, heads=2, seq=16, batch=8)
    return GPTConfig()


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A small GPT: token and position embeddings, ``layers`` blocks, tied output layer."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.seq, cfg.dim))
        self.blocks = nn.Sequential(*(Block(cfg.dim, cfg.heads) for _ in range(cfg.layers)))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_gpt(cfg: GPTConfig, seed: int = 0, device: str | torch.device = "cpu") -> TinyGPT:
    """A freshly initialised :class:`TinyGPT` (deterministic for a seed)."""
    torch.manual_seed(seed)
    return TinyGPT(cfg).to(device)


def lm_batches(
    cfg: GPTConfig, n: int, seed: int = 0, device: str | torch.device = "cpu"
) -> list[dict[str, torch.Tensor]]:
    """``n`` random token batches ``{"x": (batch, seq), "y": (batch, seq)}`` (next tokens)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), generator=gen)
        out.append({"x": tokens[:, :-1].to(device), "y": tokens[:, 1:].to(device)})
    return out


def param_layout(
    n_tensors: int, total: int, seed: int = 0, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """``n_tensors`` random tensors holding ``total`` elements in all (the optimizer layouts)."""
    gen = torch.Generator().manual_seed(seed)
    size = max(1, total // n_tensors)
    return [torch.randn(size, generator=gen).to(device) for _ in range(n_tensors)]
