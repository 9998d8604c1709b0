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


@pytest.mark.parametrize("precision", ["autocast-bf16", "bf16-inputs"])
def test_ranks_are_exact_whatever_the_training_precision(precision):
    """Ranks under `torch.autocast(bf16)` (Lightning's bf16-mixed) and of bf16 vectors (DeepSpeed
    bf16) equal a float64 brute force: ranking runs in float32 at least, outside autocast.

    Tolerance-free: every coordinate is k/64 with |k| <= 64, exact in bf16, float32 and float64;
    a product is a multiple of 2^-12 and a score (or any partial sum, in any order) is at most 32
    in magnitude, so it needs at most 17 significant bits: float32 (24) computes every score
    exactly, hence its ranks (ties included) are float64's. bf16 (8 bits) would round them."""
    rng = np.random.default_rng(1)
    num_users, num_items, dim, history = 64, 5000, 32, 12
    users = rng.integers(-64, 65, size=(num_users, dim)) / 64.0
    items = rng.integers(-64, 65, size=(num_items, dim)) / 64.0
    items[rng.choice(num_items, 200, replace=False)] = items[rng.integers(0, num_items, 200)]  # exact ties
    targets = rng.integers(0, num_items, size=num_users)
    exclude = np.full((num_users, history), -1)
    for u in range(num_users):
        n = rng.integers(0, history + 1)
        exclude[u, history - n:] = rng.choice(num_items, size=n, replace=False)
        if u % 5 == 0 and n:
            exclude[u, -1] = targets[u]  # the target stays ranked even when in the history

    users32, items32 = users.astype(np.float32), items.astype(np.float32)
    scores = users32.astype(np.float64) @ items32.astype(np.float64).T  # the reference, in float64
    others = scores >= scores[np.arange(num_users), targets][:, None]
    for u in range(num_users):
        others[u, exclude[u][exclude[u] >= 0]] = False
    others[np.arange(num_users), targets] = False  # the target is not one of the other items, nor excluded
    expected = others.sum(1)

    users_t, items_t = torch.from_numpy(users32), torch.from_numpy(items32)
    targets_t, exclude_t = torch.from_numpy(targets), torch.from_numpy(exclude)
    for chunk_size in (65536, 999):
        if precision == "bf16-inputs":
            ranks = target_ranks(users_t.bfloat16(), items_t.bfloat16(), targets_t, exclude_t, chunk_size)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ranks = target_ranks(users_t, items_t, targets_t, exclude_t, chunk_size)
        assert ranks.dtype == torch.long
        np.testing.assert_array_equal(ranks.numpy(), expected)
    assert target_ranks(users_t, items_t, targets_t, exclude_t).tolist() == expected.tolist()  # float32, no autocast
