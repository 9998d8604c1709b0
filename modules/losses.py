"""Next-item objectives: softmax cross-entropy of each position's user state against a candidate set.

Candidates are either the whole catalogue (exact softmax, for ID mode where it fits) or the
batch's distinct items plus uniformly sampled negatives ("mixed negative sampling"). A sampled
softmax over-weights what the sampler over-proposes, so with `log_q` each logit is corrected by
log of that candidate's expected number of draws (Yi et al., RecSys 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def expected_draws_log(item_prob: torch.Tensor, occurrences: int, num_uniform: int, num_eligible: int) -> torch.Tensor:
    """log E[#draws] of each candidate under the mixed sampler: the batch's `occurrences` item slots
    draw items by popularity (`item_prob`, summing to 1), and `num_uniform` negatives are uniform
    over `num_eligible` items."""
    return torch.log(occurrences * item_prob + num_uniform / num_eligible)


def softmax_loss(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    log_q: torch.Tensor | None = None,
    candidate_ids: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean CE of queries [P, d] against candidates [C, d]; `labels` [P] index the positive.

    `log_q` [C]: logQ correction subtracted from the logits. `candidate_ids`/`target_ids`: mask
    accidental hits, i.e. a candidate that is the same item as the positive but sits in another
    column (possible when candidate sets are gathered from several ranks)."""
    logits = queries @ candidates.T / temperature
    if log_q is not None:
        logits = logits - log_q
    if candidate_ids is not None:
        hits = candidate_ids[None, :] == target_ids[:, None]
        hits[torch.arange(len(labels), device=labels.device), labels] = False
        logits = logits.masked_fill(hits, float("-inf"))
    return F.cross_entropy(logits.float(), labels)
