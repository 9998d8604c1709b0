"""Full-ranking metrics of the evaluation protocol (docs/data.md): HR@K, NDCG@K and MRR@K with one target per user.

Ties count against the target: its rank is the number of other items scored >= it, so a model
that scores everything the same ranks every target last, never first. Scores are inner products
of user and item vectors, computed `chunk_size` items at a time, so memory is bounded by
users x chunk_size whatever the catalogue size (a 1M-item catalogue ranks in a few hundred MB).
Scores are float32 (float64 vectors stay float64) whatever the training precision: bf16 vectors
(DeepSpeed bf16) are cast up, and autocast (bf16-mixed) is off while ranking, so a reported rank
never depends on a bf16 rounding of the scores."""
from __future__ import annotations

import torch


def target_ranks(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                 exclude: torch.Tensor | None = None, chunk_size: int = 65536) -> torch.Tensor:
    """0-based rank of each user's target among all items, by score <user, item>.
    users [U, d]; items [N, d]; targets [U]; exclude [U, L] item indices removed from the
    ranking (the user's history, left-padded with -1); the target itself never is.
    Scored in float32 at least (the vectors' own dtype when wider), with autocast off."""
    dtype = torch.promote_types(torch.promote_types(users.dtype, items.dtype), torch.float32)
    with torch.autocast(device_type=users.device.type, enabled=False):
        return _target_ranks(users.to(dtype), items.to(dtype), targets, exclude, chunk_size)


def _target_ranks(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                  exclude: torch.Tensor | None, chunk_size: int) -> torch.Tensor:
    target_scores = (users * items[targets]).sum(1, keepdim=True)
    rows = torch.arange(len(targets), device=targets.device)
    hidden_rows, hidden_cols = rows, targets  # the target is not one of the "other" items
    if exclude is not None:
        hidden_rows = torch.cat([rows, rows[:, None].expand_as(exclude).reshape(-1)])
        hidden_cols = torch.cat([targets, exclude.reshape(-1)])
    ranks = torch.zeros(len(targets), dtype=torch.long, device=targets.device)
    for start in range(0, len(items), chunk_size):
        scores = users @ items[start:start + chunk_size].T
        here = (hidden_cols >= start) & (hidden_cols < start + scores.shape[1])
        scores[hidden_rows[here], hidden_cols[here] - start] = float("-inf")
        ranks += (scores >= target_scores).sum(1)
    return ranks


def metrics_per_user(ranks: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user HR/NDCG/MRR at each cut-off (average them for the reported numbers)."""
    ranks = ranks.double()
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = hit.double()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0)
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / (ranks + 1.0), 0.0)
    return out


def metric_sums(users: torch.Tensor, items: torch.Tensor, histories: torch.Tensor, targets: torch.Tensor,
                ks: list[int], filter_seen: bool, chunk_size: int = 65536) -> dict[str, torch.Tensor]:
    """Per-batch sums of every metric (divide by the number of users once all batches are in)."""
    ranks = target_ranks(users, items, targets, histories if filter_seen else None, chunk_size)
    return {name: values.sum() for name, values in metrics_per_user(ranks, ks).items()}
