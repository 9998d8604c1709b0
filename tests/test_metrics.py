"""Ranking metrics against a brute-force NumPy reference: the full catalogue sorted per user,
ties broken against the target, seen items removed, the target never removed."""
import math

import numpy as np
import torch

from modules.metrics import metric_sums, metrics_per_user, seen_mask, target_ranks


def reference_rank(scores: np.ndarray, target: int, seen: set[int]) -> int:
    """Sort every remaining item by (score desc, target last among equals); return the target's place."""
    candidates = [i for i in range(len(scores)) if i == target or i not in seen]
    order = sorted(candidates, key=lambda i: (-scores[i], i == target))
    return order.index(target)


def reference_metrics(rank: int, k: int) -> tuple[float, float, float]:
    if rank >= k:
        return 0.0, 0.0, 0.0
    return 1.0, 1.0 / math.log2(rank + 2), 1.0 / (rank + 1)


def test_ranks_and_metrics_match_brute_force_with_ties_and_seen_items():
    rng = np.random.default_rng(0)
    num_users, num_items = 64, 50
    scores = rng.integers(0, 6, size=(num_users, num_items)).astype(np.float32)  # many ties
    targets = rng.integers(0, num_items, size=num_users)
    histories = np.full((num_users, 8), -1)
    for u in range(num_users):
        n = rng.integers(0, 9)
        seen = rng.choice(num_items, size=n, replace=False)
        if u % 4 == 0 and n:  # the target in the history must still be ranked
            seen[0] = targets[u]
        histories[u, 8 - n:] = seen
    history_t = torch.from_numpy(histories)
    ranks = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets), seen_mask(history_t, num_items))
    expected = [reference_rank(scores[u], targets[u], set(histories[u][histories[u] >= 0])) for u in range(num_users)]
    assert ranks.tolist() == expected

    per_user = metrics_per_user(ranks, [10, 20])
    sums = metric_sums(torch.from_numpy(scores), history_t, torch.from_numpy(targets), [10, 20], filter_seen=True)
    for k in (10, 20):
        ref = np.array([reference_metrics(r, k) for r in expected])
        for col, name in enumerate(("hr", "ndcg", "mrr")):
            np.testing.assert_allclose(per_user[f"{name}@{k}"].numpy(), ref[:, col], rtol=0, atol=1e-12)
            assert math.isclose(float(sums[f"{name}@{k}"]), ref[:, col].sum(), rel_tol=1e-12)


def test_constant_scores_rank_every_target_last():
    ranks = target_ranks(torch.zeros(3, 10), torch.tensor([0, 4, 9]))
    assert ranks.tolist() == [9, 9, 9]


def test_without_filtering_seen_items_stay_in_the_ranking():
    scores = torch.tensor([[5.0, 4.0, 3.0]])
    history = torch.tensor([[0, 1]])
    assert target_ranks(scores, torch.tensor([2]), seen_mask(history, 3)).item() == 0
    assert target_ranks(scores, torch.tensor([2])).item() == 2
