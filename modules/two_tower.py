"""The two-tower recommender as a plain `nn.Module`: item tower, user tower, inner-product head.
No training loop here (that is `twotower.modules.lit_two_tower`), so export and serving need neither
Lightning nor DeepSpeed."""
from __future__ import annotations

import torch
from torch import nn

from twotower.configs.schema import ModelConfig
from twotower.modules.distributed import gather_equal, rank_and_world
from twotower.modules.histories import Histories
from twotower.modules.item_tower import ItemTower, progress
from twotower.modules.user_tower import UserTower


class TwoTower(nn.Module):
    def __init__(self, cfg: ModelConfig, num_items: int, num_actions: int = 0):
        super().__init__()
        self.cfg, self.num_items = cfg, num_items
        self.item_tower = ItemTower(cfg.item, cfg.mode, num_items, cfg.dim)
        self.user_tower = UserTower(cfg.user, cfg.dim, num_actions)
        if cfg.loss.cold_weight > 0:  # last: every other weight starts as it does without it
            self.item_tower.add_new_item_head()

    def _encoding_order(self, device: torch.device) -> torch.Tensor:
        """Every item index, in text modes sorted by text length (so that each chunk of items pads
        to little more than its own texts)."""
        if len(self.item_tower.lengths) == self.num_items:
            return self.item_tower.lengths.argsort(stable=True).to(device)
        return torch.arange(self.num_items, device=device)

    def catalogue_share(self, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the items this rank encodes, every rank's items in rank order). In one process, or
        where an item's vector costs no encoder work (`ItemTower.encodes_items`), every item, here.
        With W ranks, rank r takes every W-th item of the length order from position r, so each
        rank gets texts of every length (equal work, each chunk still sorted by length). Shares
        are padded to ceil(N / W) with the share's last item, so every rank runs the same number
        of forward passes (ZeRO-3 gathers the weights of each one collectively) and gathers
        tensors of one shape."""
        order = self._encoding_order(device)
        rank, world = rank_and_world()
        if world == 1 or not self.item_tower.encodes_items:
            return order, [order]
        shares = [order[r::world] for r in range(world)]
        mine = shares[rank] if len(shares[rank]) else order[-1:]  # fewer items than ranks
        size = len(shares[0])
        return torch.cat([mine, mine[-1:].expand(size - len(mine))]), shares

    def catalogue_table(self, chunk_size: int | None = None) -> torch.Tensor:
        """[N, d] vectors of every catalogue item, differentiable when grad is enabled (the
        full-catalogue softmax). `chunk_size`: items per item-tower call (None: one call, which
        the item tower itself cuts into length buckets). With several ranks (torch.distributed
        initialised) each encodes its share (`catalogue_share`) and the shares are gathered:
        the same vectors as one process computes. With grad the gather is differentiable
        (`modules.distributed.gather_equal`): the gradient of every rank's loss goes back to the
        rank that encoded the item, so the gradients summed over ranks are those of every rank
        encoding the whole catalogue itself."""
        return self._over_catalogue(self.item_tower, chunk_size)

    @torch.no_grad()
    def catalogue_pooled(self, chunk_size: int) -> torch.Tensor:
        """[N, hidden] pooled encoder output of every catalogue item (text modes), `chunk_size`
        items at a time, split across ranks as `catalogue_table` splits them: the stale table that
        `model.loss.refresh_every` re-encodes."""
        return self._over_catalogue(self.item_tower.pooled, chunk_size)

    def _over_catalogue(self, encode, chunk_size: int | None) -> torch.Tensor:
        """`encode` (item indices -> [n, k]) run over this rank's share of the catalogue, the
        shares gathered (differentiably when grad is enabled) into rows of item order."""
        device = self.user_tower.positions.weight.device
        mine, shares = self.catalogue_share(device)
        if chunk_size:
            chunks = progress(mine.split(chunk_size), "encode catalogue", len(mine), chunk_size)
            vectors = torch.cat([encode(chunk) for chunk in chunks])
        else:
            vectors = encode(mine)
        if len(shares) == 1:
            parts = [vectors]
        else:
            gathered = gather_equal(vectors, grad=torch.is_grad_enabled())
            parts = [gathered[r, :len(share)] for r, share in enumerate(shares)]
        table = vectors.new_empty(self.num_items, vectors.shape[1])
        for share, part in zip(shares, parts):  # row i: item i (at 1M items a copy of the table is ~256 MB: one, not two)
            table.index_copy_(0, share, part)
        return table

    @torch.no_grad()
    def catalogue_vectors(self, batch_size: int) -> torch.Tensor:
        """[N, d] vectors of every catalogue item, encoded `batch_size` items at a time (in text
        modes in order of text length, so each chunk pads to little more than its own texts),
        split across ranks where there are several (`catalogue_table`)."""
        return self.catalogue_table(batch_size)

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
