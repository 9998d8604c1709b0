"""Full-ranking metrics of SPEC.md: HR@K, NDCG@K and MRR@K with one target per user.

Ties count against the target: its rank is the number of other items scored >= it, so a model
that scores everything the same ranks every target last, never first."""
from __future__ import annotations

import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each row's target among all items. scores [U, N]; targets [U];
    exclude [U, N] marks items removed from the ranking (seen items); the target never is."""
    target_scores = scores.gather(1, targets[:, None])
    if exclude is not None:
        exclude = exclude.clone()
        exclude[torch.arange(len(targets), device=targets.device), targets] = False
        scores = scores.masked_fill(exclude, float("-inf"))
    return (scores >= target_scores).sum(1) - 1


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


def seen_mask(histories: torch.Tensor, num_items: int) -> torch.Tensor:
    """[U, N] boolean: True where the item is in the (left-padded with -1) history."""
    mask = torch.zeros(histories.shape[0], num_items + 1, dtype=torch.bool, device=histories.device)
    mask.scatter_(1, torch.where(histories < 0, num_items, histories), True)
    return mask[:, :num_items]


def metric_sums(scores: torch.Tensor, histories: torch.Tensor, targets: torch.Tensor, ks: list[int], filter_seen: bool) -> dict[str, torch.Tensor]:
    """Per-batch sums of every metric (divide by the number of users once all batches are in)."""
    exclude = seen_mask(histories, scores.shape[1]) if filter_seen else None
    return {name: values.sum() for name, values in metrics_per_user(target_ranks(scores, targets, exclude), ks).items()}
