"""Ranking metrics against a brute-force NumPy reference: the full catalogue sorted per user,
ties broken against the target, seen items removed, the target never removed; chunked scoring
gives the same ranks whatever the chunk size."""
import math

import numpy as np
import pytest
import torch

from twotower.modules.metrics import metric_sums, metrics_per_user, target_ranks


def reference_rank(scores: np.ndarray, target: int, seen: set[int]) -> int:
    """Sort every remaining item by (score desc, target last among equals); return the target's place."""
    candidates = [i for i in range(len(scores)) if i == target or i not in seen]
    order = sorted(candidates, key=lambda i: (-scores[i], i == target))
    return order.index(target)


def reference_metrics(rank: int, k: int) -> tuple[float, float, float]:
    if rank >= k:
        return 0.0, 0.0, 0.0
    return 1.0, 1.0 / math.log2(rank + 2), 1.0 / (rank + 1)


@pytest.mark.parametrize("chunk_size", [50, 7, 1])  # one chunk; chunks that split the catalogue unevenly; one item each
def test_ranks_and_metrics_match_brute_force_with_ties_and_seen_items(chunk_size):
    rng = np.random.default_rng(0)
    num_users, num_items, dim = 64, 50, 3
    users = rng.integers(-2, 3, size=(num_users, dim)).astype(np.float64)
    items = rng.integers(-2, 3, size=(num_items, dim)).astype(np.float64)  # small integers: many exact ties
    scores = users @ items.T
    targets = rng.integers(0, num_items, size=num_users)
    histories = np.full((num_users, 8), -1)
    for u in range(num_users):
        n = rng.integers(0, 9)
        seen = rng.choice(num_items, size=n, replace=False)
        if u % 4 == 0 and n:  # the target in the history must still be ranked
            seen[0] = targets[u]
        histories[u, 8 - n:] = seen
    users_t, items_t, targets_t, history_t = (torch.from_numpy(a) for a in (users, items, targets, histories))
    ranks = target_ranks(users_t, items_t, targets_t, history_t, chunk_size)
    expected = [reference_rank(scores[u], targets[u], set(histories[u][histories[u] >= 0])) for u in range(num_users)]
    assert ranks.tolist() == expected

    per_user = metrics_per_user(ranks, [10, 20])
    sums = metric_sums(users_t, items_t, history_t, targets_t, [10, 20], filter_seen=True, chunk_size=chunk_size)
    for k in (10, 20):
        ref = np.array([reference_metrics(r, k) for r in expected])
        for col, name in enumerate(("hr", "ndcg", "mrr")):
            np.testing.assert_allclose(per_user[f"{name}@{k}"].numpy(), ref[:, col], rtol=0, atol=1e-12)
            assert math.isclose(float(sums[f"{name}@{k}"]), ref[:, col].sum(), rel_tol=1e-12)


def test_constant_scores_rank_every_target_last():
    ranks = target_ranks(torch.ones(3, 2), torch.zeros(10, 2), torch.tensor([0, 4, 9]), chunk_size=4)
    assert ranks.tolist() == [9, 9, 9]


def test_without_filtering_seen_items_stay_in_the_ranking():
    users, items = torch.ones(1, 1), torch.tensor([[5.0], [4.0], [3.0]])
    history = torch.tensor([[0, 1]])
    assert target_ranks(users, items, torch.tensor([2]), history).item() == 0
    assert target_ranks(users, items, torch.tensor([2])).item() == 2
