"""User tower g(history) -> R^d: a causal transformer over the item vectors of a user's history.

Histories are left-padded so the newest item is always the last position; one forward pass
gives the state after every prefix, so one sequence trains every next-item position at once, and
the user vector is the last position's state. Blocks are pre-LayerNorm with SDPA attention
(nanoGPT style); with `activation_checkpointing` each block recomputes its activations in the
backward pass (torch restores the RNG state, so dropout draws the same masks again)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from configs.schema import UserTowerConfig


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, ffn_mult: int):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln_attn, self.ln_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).split(d, dim=2)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(y.transpose(1, 2).reshape(b, n, d)))
        return x + self.mlp(self.ln_mlp(x))


def causal_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] boolean: position i may attend to j <= i when j holds an item. Every position
    may also attend to itself, so a padding row is never all-masked (which would give NaN)."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


class UserTower(nn.Module):
    def __init__(self, cfg: UserTowerConfig, dim: int):
        super().__init__()
        self.max_len, self.activation_checkpointing = cfg.max_len, cfg.activation_checkpointing
        self.from_start = cfg.positions == "from_start"
        self.positions = nn.Embedding(cfg.max_len, dim)
        nn.init.normal_(self.positions.weight, std=0.02)  # N(0, 1) would drown the item vectors
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(dim, cfg.heads, cfg.dropout, cfg.ffn_mult) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(dim)

    def forward(self, item_vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """item_vectors [B, L, d] (left-padded, L <= max_len), valid [B, L] -> states [B, L, d]."""
        length = item_vectors.shape[1]
        if length > self.max_len:
            raise ValueError(f"history of {length} items is longer than model.user.max_len={self.max_len}")
        if self.from_start:  # the oldest item shown is position 0, whatever the padding
            positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        else:  # the newest item is always position max_len - 1
            positions = torch.arange(self.max_len - length, self.max_len, device=item_vectors.device)
        x = item_vectors * valid.unsqueeze(-1).to(item_vectors.dtype) + self.positions(positions)
        x = self.drop(x)
        mask = causal_padding_mask(valid)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, mask, use_reentrant=False) if recompute else block(x, mask)
        return self.ln_final(x)
