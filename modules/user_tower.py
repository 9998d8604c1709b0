"""User tower g(history) -> R^d: a causal transformer over the item vectors of a user's history.

Histories are left-padded so the newest item is always the last position; one forward pass
gives the state after every prefix, so one sequence trains every next-item position at once, and
the user vector is the last position's state. Two block designs (`model.user.architecture`):
- `sasrec`: SASRec's own (Kang & McAuley 2018, as in the SASRec+ code): inputs scaled by sqrt(d),
  the query is LayerNorm(x) while keys and values read x itself, the residual adds to LayerNorm(x),
  a point-wise ReLU feed-forward with dropout after both linears, N(0, 0.02) linear weights, and
  padding slots zeroed after every block.
- `pre_ln`: GPT-2/nanoGPT pre-LayerNorm blocks with a GELU MLP, the residual stream untouched.
Optional features (`time_gaps`, `actions`) add a learned embedding of each history item's
time-gap code and action code to its input, like the position's. Attention is SDPA in both. With `activation_checkpointing` each block recomputes its activations in
the backward pass (torch restores the RNG state, so dropout draws the same masks again)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from twotower.configs.schema import UserTowerConfig
from twotower.modules.histories import TIME_GAP_CODES


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, attn_mask: torch.Tensor, dropout: float) -> torch.Tensor:
    """Multi-head SDPA over [B, L, d] queries, keys and values -> [B, L, d]."""
    b, n, d = q.shape
    q, k, v = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
    return y.transpose(1, 2).reshape(b, n, d)


class PreLNBlock(nn.Module):
    scales_input, norm_eps = False, 1e-5

    def __init__(self, dim: int, heads: int, dropout: float, ffn_mult: int):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln_attn, self.ln_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    @staticmethod
    def initialise(blocks: nn.ModuleList, dim: int) -> None:
        """torch's default initialisation, as built."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`valid` is unused: padding slots are masked as keys and never read out."""
        q, k, v = self.qkv(self.ln_attn(x)).split(x.shape[-1], dim=2)
        x = x + self.drop(self.out(attend(q, k, v, self.heads, attn_mask, self.dropout if self.training else 0.0)))
        return x + self.mlp(self.ln_mlp(x))


class SASRecBlock(nn.Module):
    scales_input, norm_eps = True, 1e-8

    def __init__(self, dim: int, heads: int, dropout: float, ffn_mult: int):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln_attn, self.ln_mlp = nn.LayerNorm(dim, eps=self.norm_eps), nn.LayerNorm(dim, eps=self.norm_eps)
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.Dropout(dropout), nn.ReLU(),
                                 nn.Linear(ffn_mult * dim, dim), nn.Dropout(dropout))

    @staticmethod
    def initialise(blocks: nn.ModuleList, dim: int) -> None:
        """As SASRec+ initialises: N(0, 0.02) linears with zero biases, except the attention input
        projection, which nn.MultiheadAttention keeps at its own Xavier-uniform over [3d, d]. (Draws
        in this order, all blocks at once, so a seed gives the weights the README's runs had.)"""
        for module in blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        bound = math.sqrt(6.0 / (dim + 3 * dim))
        for block in blocks:
            for weight in (block.q.weight, block.kv.weight):
                nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        query = self.ln_attn(x)
        k, v = self.kv(x).split(x.shape[-1], dim=2)
        x = query + self.out(attend(self.q(query), k, v, self.heads, attn_mask, self.dropout if self.training else 0.0))
        x = self.ln_mlp(x)
        return (x + self.mlp(x)) * valid.unsqueeze(-1).to(x.dtype)


BLOCKS = {"sasrec": SASRecBlock, "pre_ln": PreLNBlock}


def causal_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] boolean: position i may attend to j <= i when j holds an item. Every position
    may also attend to itself, so a padding row is never all-masked (which would give NaN)."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


class UserTower(nn.Module):
    def __init__(self, cfg: UserTowerConfig, dim: int, num_actions: int = 0):
        """`num_actions`: the action codes of the data (1..num_actions; 0 is unknown)."""
        super().__init__()
        self.max_len, self.activation_checkpointing = cfg.max_len, cfg.activation_checkpointing
        self.from_start = cfg.positions == "from_start"
        block = BLOCKS[cfg.architecture]
        self.input_scale = math.sqrt(dim) if block.scales_input else 1.0
        self.positions = nn.Embedding(cfg.max_len, dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(block(dim, cfg.heads, cfg.dropout, cfg.ffn_mult) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(dim, eps=block.norm_eps)
        block.initialise(self.blocks, dim)
        nn.init.normal_(self.positions.weight, std=0.02)  # N(0, 1) would drown the item vectors
        if cfg.actions and num_actions == 0:
            raise ValueError("model.user.actions=true, but the data has no action codes (manifest.json's actions is empty)")
        # Built last, so that without them a seed draws the weights it always drew.
        self.time_gaps = self._feature(TIME_GAP_CODES, dim) if cfg.time_gaps else None
        self.actions = self._feature(num_actions + 1, dim) if cfg.actions else None

    @staticmethod
    def _feature(codes: int, dim: int) -> nn.Embedding:
        table = nn.Embedding(codes, dim)
        nn.init.normal_(table.weight, std=0.02)
        return table

    def set_dropout(self, rate: float) -> None:
        """Every dropout of the tower (inputs, attention, blocks) at `rate` from now on."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = rate
            elif isinstance(module, tuple(BLOCKS.values())):
                module.dropout = rate

    def forward(self, item_vectors: torch.Tensor, valid: torch.Tensor, gaps: torch.Tensor | None = None,
                actions: torch.Tensor | None = None) -> torch.Tensor:
        """item_vectors [B, L, d] (left-padded, L <= max_len), valid [B, L], the time-gap and action
        codes [B, L] (read only by a tower built with those features) -> states [B, L, d]."""
        length = item_vectors.shape[1]
        if length > self.max_len:
            raise ValueError(f"history of {length} items is longer than model.user.max_len={self.max_len}")
        if self.from_start:  # the oldest item shown is position 0, whatever the padding
            positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        else:  # the newest item is always position max_len - 1
            positions = torch.arange(self.max_len - length, self.max_len, device=item_vectors.device)
        x = item_vectors * self.input_scale + self.positions(positions)
        for table, codes in ((self.time_gaps, gaps), (self.actions, actions)):
            if table is not None:
                x = x + table(codes)
        keep = valid.unsqueeze(-1).to(item_vectors.dtype)
        x = self.drop(x) * keep
        mask = causal_padding_mask(valid)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, mask, valid, use_reentrant=False) if recompute else block(x, mask, valid)
        return self.ln_final(x)
