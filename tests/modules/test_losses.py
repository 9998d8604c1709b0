"""The softmax objective against float64 references computed by hand."""
import math

import numpy as np
import torch

from twotower.modules.losses import expected_draws_log, softmax_loss


def reference_ce(q, c, labels, temperature, log_q=None, masked=None):
    q, c = q.astype(np.float64), c.astype(np.float64)
    total = 0.0
    for p in range(len(q)):
        logits = c @ q[p] / temperature - (log_q if log_q is not None else 0.0)
        if masked is not None:
            logits = np.where(masked[p], -np.inf, logits)
        total += -(logits[labels[p]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
    return total / len(q)


def test_softmax_loss_matches_float64_reference_with_logq():
    rng = np.random.default_rng(1)
    q, c = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
    labels = rng.integers(0, 11, size=7)
    log_q = np.log(rng.uniform(0.01, 1.0, size=11))
    got = softmax_loss(torch.tensor(q), torch.tensor(c), torch.tensor(labels), 0.5, torch.tensor(log_q))
    assert math.isclose(got.item(), reference_ce(q, c, labels, 0.5, log_q), rel_tol=1e-6)


def test_accidental_hits_are_masked_but_the_label_is_kept():
    rng = np.random.default_rng(2)
    q, c = rng.normal(size=(3, 4)), rng.normal(size=(6, 4))
    candidate_ids = torch.tensor([10, 11, 12, 10, 13, 11])  # items 10 and 11 appear twice (two ranks)
    labels = torch.tensor([0, 5, 2])
    target_ids = candidate_ids[labels]
    masked = np.zeros((3, 6), dtype=bool)
    masked[0, 3] = True  # the other copy of item 10
    masked[1, 1] = True  # the other copy of item 11
    got = softmax_loss(torch.tensor(q), torch.tensor(c), labels, 1.0, None, candidate_ids, target_ids)
    assert math.isclose(got.item(), reference_ce(q, c, labels.numpy(), 1.0, masked=masked), rel_tol=1e-6)


def test_expected_draws_is_the_mixture_formula():
    prob = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    got = expected_draws_log(prob, occurrences=10, num_uniform=6, num_eligible=3)
    np.testing.assert_allclose(got.numpy(), np.log(10 * prob.numpy() + 6 / 3))


def test_full_softmax_leaves_cold_items_out_of_the_candidates():
    """Held-out (cold) items do not exist while training: the full-catalogue loss is the float64
    cross-entropy over the warm items only, not a softmax that learns to push cold items down."""
    from twotower.configs import load_config
    from twotower.modules.histories import Histories
    from twotower.modules.lit_two_tower import TwoTowerModule

    cfg = load_config([], ["model.mode=id", "model.dim=8", "data.max_len=4", "model.user.dropout=0"])
    cold = torch.tensor([False, True, False, False, True, False])
    torch.manual_seed(0)
    module = TwoTowerModule(cfg, len(cold), torch.ones(len(cold)), cold).eval()
    module.log = lambda *args, **kwargs: None  # no Trainer attached
    inputs, targets = torch.tensor([[-1, 0, 2, 3], [0, 3, 5, 2]]), torch.tensor([[-1, 2, 3, 5], [3, 5, 2, 0]])
    loss = module.training_step((Histories.of(inputs), targets), 0)
    with torch.no_grad():
        table = module.model.item_tower(torch.arange(len(cold)))
        states = module.model.user_states(inputs, table)[targets >= 0]
    warm = torch.nonzero(~cold).squeeze(1)
    labels = [warm.tolist().index(t) for t in targets[targets >= 0].tolist()]
    expected = reference_ce(states.numpy(), table[warm].numpy(), labels, 1.0)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
