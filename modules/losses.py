"""Next-item objectives: softmax cross-entropy of each position's user state against a candidate set.

Candidates are either the whole catalogue (exact softmax, for ID mode where it fits) or the
batch's distinct items plus uniformly sampled negatives ("mixed negative sampling"). A sampled
softmax over-weights what the sampler over-proposes, so with `log_q` each logit is corrected by
log of that candidate's expected number of draws (Yi et al., RecSys 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from twotower.modules.distributed import all_reduce_sum, gather_rows, rank_and_world


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
    drop: torch.Tensor | None = None,
    text_candidates: torch.Tensor | None = None,
    text_weight: float = 0.0,
) -> torch.Tensor:
    """Mean CE of queries [P, d] against candidates [C, d]; `labels` [P] index the positive.

    `log_q` [C]: logQ correction subtracted from the logits. `candidate_ids`/`target_ids`: mask
    accidental hits, i.e. a candidate that is the same item as the positive but sits in another
    column (possible when candidate sets are gathered from several ranks). `drop` [C] bool: columns
    left out of every query's softmax (duplicates), except where a column is the query's label.

    `text_candidates` [C, d]: each candidate's new-item vector, the one it would be served with had
    it never trained (`model.loss.cold_weight`). Added to the loss: two CEs over both copies of
    every candidate, [C full | C new-item], with the same logQ and masks, one for each positive's
    full copy (its new-item copy left out), plus `text_weight` times one for its new-item copy (its
    full copy left out). In them only the new-item vectors learn: the queries and the full copies
    are held fixed, so the model and its ranking of trained items are what they would be without
    these terms, and the new-item vectors learn to rank among them: above trained items where the
    user goes to that item, below a trained item the user goes to. `text_weight` is the prior odds
    of a new item against a trained one: at 1 they compete as equals, below 1 a new item must score
    higher than a trained one to rank above it."""
    masked = None
    if candidate_ids is not None or drop is not None:
        masked = torch.zeros(len(queries), len(candidates), dtype=torch.bool, device=queries.device)
        if candidate_ids is not None:
            masked |= candidate_ids[None, :] == target_ids[:, None]
        if drop is not None:
            masked |= drop[None, :]
        masked[torch.arange(len(labels), device=labels.device), labels] = False

    def scored(table: torch.Tensor, queries: torch.Tensor = queries) -> torch.Tensor:
        logits = queries @ table.T
        if temperature != 1.0:  # a full pass over [P, C] logits: skipped when it would change nothing
            logits = logits / temperature
        if log_q is not None:
            logits = logits - log_q
        if masked is not None:
            logits = logits.masked_fill(masked, float("-inf"))
        return logits if logits.dtype == torch.float64 else logits.float()

    logits = scored(candidates)
    loss = F.cross_entropy(logits, labels)
    if text_candidates is None:
        return loss
    fixed, text = logits.detach(), scored(text_candidates, queries.detach())
    own = (torch.arange(len(labels), device=labels.device), labels)
    full_positive = F.cross_entropy(torch.cat([fixed, text.index_put(own, text.new_tensor(float("-inf")))], 1), labels)
    text_positive = F.cross_entropy(torch.cat([fixed.index_put(own, fixed.new_tensor(float("-inf"))), text], 1),
                                    labels + len(candidates))
    return loss + full_positive + text_weight * text_positive


def first_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """[C] bool: True at the first column holding each id."""
    _, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(len(ids), device=ids.device)
    first = torch.full((int(inverse.max()) + 1 if len(ids) else 0,), len(ids), device=ids.device, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    keep = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    keep[first] = True
    return keep


def cross_rank_softmax_loss(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    candidate_ids: torch.Tensor,
    temperature: float = 1.0,
    item_prob: torch.Tensor | None = None,
    occurrences: int = 0,
    num_uniform: int = 0,
    num_eligible: int = 1,
    text_candidates: torch.Tensor | None = None,
    text_weight: float = 0.0,
) -> torch.Tensor:
    """Sampled softmax whose candidate set is the union of every rank's candidates (with
    `text_candidates`, gathered alike, and `text_weight` as in `softmax_loss`).

    Each rank brings its queries [P_r, d], its distinct candidates [C_r, d] (batch items and
    uniform negatives, C_r differing across ranks) with their item ids, and each query's label
    (a column of its own candidates). Why the result is the single-process loss over the
    concatenated batch, gradients included:

    * Candidates: `gather_rows` concatenates all ranks' candidates in rank order, so this rank's
      column j moves to `offset + j`, offset = sum of the earlier ranks' C (open_clip's label
      offset by rank). Gradients of other ranks' columns are sent back to their owners.
    * Duplicates: an item can be a candidate on several ranks. Each item must be one column of the
      softmax, as in the union a single process would build, so every column but the item's first
      is dropped; for the item that is a query's positive, the query's own label column is kept
      and every other copy is masked as an accidental hit (`softmax_loss`'s id masking).
    * logQ: the global sampler drew sum_r(occurrences_r) batch slots by popularity and
      sum_r(num_uniform_r) uniform negatives, so the expected draws of item i are
      occ * p_i + uniform / eligible with those global totals, computed from the gathered ids.
    * Weighting: DDP and DeepSpeed average gradients over ranks, so each rank returns its mean loss
      times P_r * W / P (P = all ranks' queries): the average over ranks is then the mean over
      every query of the global batch, whatever each rank's share of positions.
    """
    rank, world = rank_and_world()
    all_candidates, sizes = gather_rows(candidates)
    all_ids, _ = gather_rows(candidate_ids, fill=-1)
    global_labels = labels + sum(sizes[:rank])
    totals = all_reduce_sum(torch.tensor([float(occurrences), float(num_uniform), float(len(labels))],
                                         dtype=torch.float64, device=queries.device))
    log_q = None
    if item_prob is not None:
        log_q = torch.log(totals[0] * item_prob[all_ids].double() + totals[1] / num_eligible).to(all_candidates.dtype)
    loss = softmax_loss(queries, all_candidates, global_labels, temperature, log_q,
                        candidate_ids=all_ids, target_ids=all_ids[global_labels], drop=~first_occurrences(all_ids),
                        text_candidates=None if text_candidates is None else gather_rows(text_candidates)[0],
                        text_weight=text_weight)
    return loss * (len(labels) * world / totals[2]).to(loss.dtype)
