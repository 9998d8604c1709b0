"""The full softmax with trainable encoder layers over a stale table (`model.loss.refresh_every`):
every item's pooled text re-encoded without grad every K steps, each step's own items encoded
afresh with grad. References: the exact full softmax (`refresh_every=0`, the whole catalogue with
grad every step) and the tower's own pooled output at the weights of the last refresh."""
import pytest
import torch

from twotower.configs import load_config
from twotower.modules.histories import Histories
from twotower.modules.item_text import load_tokenizer, tokenize
from twotower.modules.lit_two_tower import TwoTowerModule

TEXTS = ["sailing boats", "a guide to jazz piano chords", "x", "the quiet harbour", "knots", "tides and moons",
         "rope", "a long history of lighthouses along the northern coast"]
# Every item of the catalogue appears in this batch (histories and targets) ...
EVERY_INPUTS = torch.tensor([[-1, -1, 0, 1, 2, 1], [3, 3, 4, 0, 1, 2], [-1, -1, -1, -1, 5, 7]])
EVERY_TARGETS = torch.tensor([[-1, -1, 1, 2, 1, 6], [3, 4, 0, 1, 2, 2], [-1, -1, -1, -1, 7, 0]])
# ... and items 5, 6 and 7 do not appear in this one.
SOME_INPUTS = torch.tensor([[-1, -1, 0, 1, 2, 1], [3, 3, 4, 0, 1, 2]])
SOME_TARGETS = torch.tensor([[-1, -1, 1, 2, 1, 0], [3, 4, 0, 1, 2, 2]])


def module(tiny_bert: str, refresh_every: int, mode: str = "text", train_layers: int = 1) -> TwoTowerModule:
    overrides = [f"model.item.encoder={tiny_bert}", f"model.item.train_layers={train_layers}", f"model.mode={mode}",
                 "model.dim=16", "data.max_len=6", "model.loss.candidates=full", f"model.loss.refresh_every={refresh_every}"]
    if mode == "id+text":
        overrides.append("model.loss.cold_weight=1")
    n = len(TEXTS)
    cold = torch.zeros(n, dtype=torch.bool)
    cold[6] = True  # a held-out item: ranked with its new-item vector, never a target
    torch.manual_seed(0)
    m = TwoTowerModule(load_config([], overrides), n, torch.arange(n) + 1, cold).eval()  # eval: no dropout
    ids = tokenize(load_tokenizer(tiny_bert), TEXTS, 24)
    tokens = torch.zeros(n, 24, dtype=torch.long)
    for i, t in enumerate(ids):
        tokens[i, : len(t)] = torch.as_tensor(t.astype("int64"))
    m.model.item_tower.set_catalogue(tokens, torch.tensor([len(t) for t in ids]))
    m.model.item_tower.build_frozen_cache()
    return m


def loss_and_gradients(m: TwoTowerModule, inputs, targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    targets = targets.clone()
    targets[targets == 6] = -1  # the held-out item is never a target
    loss = m._full_loss(Histories.of(inputs), targets, targets >= 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["text", "id+text"])
@pytest.mark.parametrize("train_layers", [1, -1])
def test_a_batch_of_every_item_gives_the_exact_loss_and_gradients(tiny_bert, mode, train_layers):
    exact = loss_and_gradients(module(tiny_bert, 0, mode, train_layers), EVERY_INPUTS, EVERY_TARGETS)
    m = module(tiny_bert, 1, mode, train_layers)
    assert m.refreshes
    loss, grads = loss_and_gradients(m, EVERY_INPUTS, EVERY_TARGETS)
    torch.testing.assert_close(loss, exact[0], atol=1e-6, rtol=1e-6)
    assert grads.keys() == exact[1].keys() and any(".encoder." in n for n in grads)
    if mode == "id+text":
        assert any("cold_head" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], exact[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_items_outside_the_batch_are_read_from_the_stale_table_without_grad(tiny_bert):
    """Same loss as the exact softmax (the table is this step's weights), the same gradients for
    everything but the encoder, and the encoder's gradient only through the batch's own items:
    each step runs the trainable layers over those (plus one no-grad pass over the catalogue)."""
    exact = loss_and_gradients(module(tiny_bert, 0), SOME_INPUTS, SOME_TARGETS)
    m = module(tiny_bert, 1)
    rows = []
    m.model.item_tower.encoder.encoder.layer[-1].register_forward_pre_hook(
        lambda _, args: rows.append((len(args[0]), torch.is_grad_enabled())))
    loss, grads = loss_and_gradients(m, SOME_INPUTS, SOME_TARGETS)
    torch.testing.assert_close(loss, exact[0], atol=1e-6, rtol=1e-6)
    encoder = sorted(n for n in grads if ".encoder." in n)
    assert encoder and not torch.allclose(torch.cat([grads[n].flatten() for n in encoder]),
                                          torch.cat([exact[1][n].flatten() for n in encoder]), atol=1e-6, rtol=1e-5)
    for name in grads.keys() - set(encoder):
        torch.testing.assert_close(grads[name], exact[1][name], atol=1e-6, rtol=1e-5, msg=name)
    assert rows == [(len(TEXTS), False), (5, True)]  # items 0-4 afresh


def test_the_stale_table_is_re_encoded_every_k_steps(tiny_bert):
    m = module(tiny_bert, 2)
    tower = m.model.item_tower
    every = torch.arange(len(TEXTS))
    optimizer = torch.optim.SGD(m.parameters(), lr=1.0)
    seen = []
    for _ in range(4):
        with torch.no_grad():
            current = tower.pooled(every)
        loss_and_gradients(m, SOME_INPUTS, SOME_TARGETS)
        optimizer.step()
        optimizer.zero_grad()
        seen.append((m._stale.clone(), current))
    (first, at_first), (second, at_second), (third, at_third), (fourth, _) = seen
    assert not torch.allclose(at_second, at_first)  # the step changed the trainable layer
    torch.testing.assert_close(first, at_first, atol=0, rtol=0)
    torch.testing.assert_close(second, first, atol=0, rtol=0)  # one step old: not re-encoded
    torch.testing.assert_close(third, at_third, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fourth, third, atol=0, rtol=0)
