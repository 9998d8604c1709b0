"""The softmax objective against float64 references computed by hand."""
import math

import numpy as np
import pytest
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


def two_copy_reference(q, c, text, labels, temperature, weight, log_q=None):
    """float64, query by query: the CE over the full candidates, plus the CEs over [full | new-item]
    copies with the positive's other copy left out, for its full copy and (times `weight`) for its
    new-item copy."""
    q, c, text = (a.astype(np.float64) for a in (q, c, text))
    total = 0.0
    for p, label in enumerate(labels):
        full = c @ q[p] / temperature - (log_q if log_q is not None else 0.0)
        alone = text @ q[p] / temperature - (log_q if log_q is not None else 0.0)
        total += -(full[label] - np.log(np.exp(full).sum()))
        for positive, other, scale in ((full, alone, 1.0), (alone, full, weight)):
            logits = np.concatenate([positive, np.delete(other, label)])
            total += scale * -(positive[label] - np.log(np.exp(logits).sum()))
    return total / len(labels)


def test_new_item_copies_add_a_two_copy_term_that_trains_only_them():
    """text_candidates + text_weight (model.loss.cold_weight): the value against a float64
    reference; the gradients of the queries and the full candidates are the plain loss's."""
    rng = np.random.default_rng(3)
    q, c, text = rng.normal(size=(6, 5)), rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
    labels = rng.integers(0, 9, size=6)
    log_q = np.log(rng.uniform(0.01, 1.0, size=9))
    tensors = [torch.tensor(a, requires_grad=True) for a in (q, c, text)]
    got = softmax_loss(tensors[0], tensors[1], torch.tensor(labels), 0.7, torch.tensor(log_q),
                       text_candidates=tensors[2], text_weight=0.4)
    assert math.isclose(got.item(), two_copy_reference(q, c, text, labels, 0.7, 0.4, log_q), rel_tol=1e-9)
    got.backward()
    plain = [torch.tensor(a, requires_grad=True) for a in (q, c)]
    softmax_loss(plain[0], plain[1], torch.tensor(labels), 0.7, torch.tensor(log_q)).backward()
    for trained, reference in zip(tensors[:2], plain):
        torch.testing.assert_close(trained.grad, reference.grad, rtol=1e-12, atol=1e-12)
    assert tensors[2].grad.abs().sum() > 0


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


@pytest.mark.parametrize("candidates,dedup", [("full", True), ("sampled", True), ("sampled", False)])
def test_cold_weight_trains_the_new_item_head_and_held_out_items_use_it(tiny_bert, candidates, dedup):
    """id+text with model.loss.cold_weight: the full-softmax loss is the float64 two-copy loss
    over the warm items' full vectors and their new-item vectors (the new-item head on the pooled
    text), and only that head learns from the extra term, with full or sampled candidates (each
    distinct item encoded once, or every occurrence). Held-out items get the new-item vector, as
    serving embeds an item added after training."""
    from twotower.configs import load_config
    from twotower.modules.histories import Histories
    from twotower.modules.item_text import load_tokenizer, tokenize
    from twotower.modules.lit_two_tower import TwoTowerModule

    def module_with(cold_weight):
        cfg = load_config([], ["model.mode=id+text", f"model.item.encoder={tiny_bert}", "model.item.train_layers=0",
                               "model.dim=8", "data.max_len=4", "model.user.dropout=0", f"model.loss.cold_weight={cold_weight}",
                               f"model.loss.candidates={candidates}", "model.loss.num_negatives=3", f"model.item.dedup={dedup}"])
        torch.manual_seed(0)
        module = TwoTowerModule(cfg, len(cold), torch.ones(len(cold)), cold)
        module.model.item_tower.set_catalogue(torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True),
                                              torch.tensor([len(t) for t in tokens]))
        module.model.item_tower.encoder.eval()  # no encoder dropout: the text part is deterministic
        module.log = lambda *args, **kwargs: None  # no Trainer attached
        return module

    cold = torch.tensor([False, True, False, False, True, False])
    tokens = [torch.from_numpy(t.astype(np.int64)) for t in tokenize(load_tokenizer(tiny_bert), [f"item {i} text" for i in range(6)], 8)]
    module, plain = module_with(0.5), module_with(0)
    tower = module.model.item_tower
    assert not tower.id_embedding.weight[cold].any()
    assert tower.id_embedding.weight[~cold].abs().min() > 0
    inputs, targets = torch.tensor([[-1, 0, 2, 3], [0, 3, 5, 2]]), torch.tensor([[-1, 2, 3, 5], [3, 5, 2, 0]])
    torch.manual_seed(1)  # the same sampled negatives for both
    loss = module.training_step((Histories.of(inputs), targets), 0)
    loss.backward()
    torch.manual_seed(1)
    plain.training_step((Histories.of(inputs), targets), 0).backward()
    trained = dict(plain.named_parameters())
    for name, parameter in module.named_parameters():
        if "cold_head" in name:
            assert parameter.grad.abs().sum() > 0, name
        elif parameter.requires_grad:  # the model's own gradients are what they are without the term
            torch.testing.assert_close(parameter.grad, trained[name].grad, msg=name)
    with torch.no_grad():
        items = torch.arange(len(cold))
        table, text = tower(items), tower(items, text_only=True)
        states = module.model.user_states(inputs, table)[targets >= 0]
        mask = (torch.arange(tower.tokens.shape[1]) < tower.lengths[:, None]).long()
        pooled = tower._pooled_text(tower.tokens.long(), mask)
        torch.testing.assert_close(text, tower.cold_head(pooled))
        torch.testing.assert_close(tower.encode_new(tower.tokens.long(), mask), text)
        full = tower.encode_text(tower.tokens.long(), mask) + tower.id_embedding.weight
    torch.testing.assert_close(table[~cold], full[~cold])
    torch.testing.assert_close(table[cold], text[cold])  # held out: served as new
    if candidates == "sampled":
        return  # its candidates are a draw; softmax_loss itself is checked above
    warm = torch.nonzero(~cold).squeeze(1)
    labels = [warm.tolist().index(t) for t in targets[targets >= 0].tolist()]
    expected = two_copy_reference(states.numpy(), table[warm].numpy(), text[warm].numpy(), labels, 1.0, 0.5)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
