"""The two-tower recommender as a plain `nn.Module`: item tower, user tower, inner-product head.
No training loop here (that is `twotower.modules.lit_two_tower`), so export and serving need neither
Lightning nor DeepSpeed."""
from __future__ import annotations

import torch
from torch import nn

from twotower.configs.schema import ModelConfig
from twotower.modules.histories import Histories
from twotower.modules.item_tower import ItemTower, progress
from twotower.modules.user_tower import UserTower


class TwoTower(nn.Module):
    def __init__(self, cfg: ModelConfig, num_items: int, num_actions: int = 0):
        super().__init__()
        self.cfg, self.num_items = cfg, num_items
        self.item_tower = ItemTower(cfg.item, cfg.mode, num_items, cfg.dim)
        self.user_tower = UserTower(cfg.user, cfg.dim, num_actions)

    @torch.no_grad()
    def catalogue_vectors(self, batch_size: int) -> torch.Tensor:
        """[N, d] vectors of every catalogue item, encoded `batch_size` items at a time (in text
        modes in order of text length, so each chunk pads to little more than its own texts)."""
        device = self.user_tower.positions.weight.device
        items = torch.arange(self.num_items, device=device)
        if len(self.item_tower.lengths) == self.num_items:
            items = self.item_tower.lengths.argsort(stable=True)
        chunks = progress(items.split(batch_size), "encode catalogue", len(items), batch_size)
        vectors = torch.cat([self.item_tower(chunk) for chunk in chunks])
        return vectors[items.argsort()]

    def user_states(self, history: Histories | torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """history: `Histories`, or [B, L] item indices left-padded with -1 (features unknown);
        item_vectors [N, d] -> states [B, L, d]."""
        items, gaps, actions = history if isinstance(history, Histories) else Histories.of(history)
        return self.user_tower(item_vectors[items.clamp_min(0)], items >= 0, gaps, actions)

    def user_vectors(self, history: Histories | torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """[B, d]: the state after the newest item of each history."""
        return self.user_states(history, item_vectors)[:, -1]

    def scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return users @ items.T / self.cfg.loss.temperature
