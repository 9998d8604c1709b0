"""The full softmax with trainable encoder layers over a stale table (`model.loss.refresh_every`):
every item's pooled text re-encoded without grad every K steps for the candidates, each step's
histories encoded afresh with grad. References: the exact full softmax (`refresh_every=0`, the
whole catalogue with grad every step), the same with the candidates' side taking no encoder
gradient, and the tower's own pooled output at the weights of the last refresh."""
import pytest
import torch

from twotower.configs import load_config
from twotower.modules.histories import Histories
from twotower.modules.item_text import load_tokenizer, tokenize
from twotower.modules.lit_two_tower import TwoTowerModule
from twotower.modules.losses import softmax_loss

TEXTS = ["sailing boats", "a guide to jazz piano chords", "x", "the quiet harbour", "knots", "tides and moons",
         "rope", "a long history of lighthouses along the northern coast"]
# Items 5, 6 and 7 are in no history: the candidates' table holds them as it does every item.
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


def key_side_frozen_reference(m: TwoTowerModule, inputs, targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The exact full softmax (`refresh_every=0`) with the candidates' vectors computed while the
    encoder's weights take no gradient: what the stale table's loss and gradients must be when it
    is re-encoded every step (MoCo: the gradient reaches the encoder through the queries alone)."""
    targets = targets.clone()
    targets[targets == 6] = -1
    positions = targets >= 0
    history_table = m.model.catalogue_table()
    encoder = [p for p in m.model.item_tower.encoder.parameters() if p.requires_grad]
    for p in encoder:
        p.requires_grad_(False)
    candidates, copies = m.model.catalogue_table(), m._text_copies(m.eligible)
    for p in encoder:
        p.requires_grad_(True)
    states = m.model.user_states(Histories.of(inputs), history_table)[positions]
    loss = softmax_loss(states, candidates[m.eligible], torch.searchsorted(m.eligible, targets[positions]),
                        m.cfg.model.loss.temperature, **copies)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["text", "id+text"])
@pytest.mark.parametrize("train_layers", [1, -1])
def test_re_encoded_every_step_it_is_the_exact_softmax_with_the_encoder_trained_through_the_histories(
        tiny_bert, mode, train_layers):
    exact = loss_and_gradients(module(tiny_bert, 0, mode, train_layers), SOME_INPUTS, SOME_TARGETS)
    reference = key_side_frozen_reference(module(tiny_bert, 0, mode, train_layers), SOME_INPUTS, SOME_TARGETS)
    m = module(tiny_bert, 1, mode, train_layers)
    assert m.refreshes
    loss, grads = loss_and_gradients(m, SOME_INPUTS, SOME_TARGETS)
    torch.testing.assert_close(loss, exact[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(reference[0], exact[0], atol=1e-6, rtol=1e-6)
    assert grads.keys() == reference[1].keys() and any(".encoder." in n for n in grads)
    if mode == "id+text":
        assert any("cold_head" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], reference[1][name], atol=1e-6, rtol=1e-5, msg=name)
    encoder = sorted(n for n in grads if ".encoder." in n)  # the exact softmax's differs: it has the candidates' part
    assert not torch.allclose(torch.cat([grads[n].flatten() for n in encoder]),
                              torch.cat([exact[1][n].flatten() for n in encoder]), atol=1e-6, rtol=1e-5)


def test_a_step_runs_the_trainable_layers_over_its_histories_and_one_no_grad_pass_over_the_catalogue(tiny_bert):
    m = module(tiny_bert, 1)
    rows = []
    m.model.item_tower.encoder.encoder.layer[-1].register_forward_pre_hook(
        lambda _, args: rows.append((len(args[0]), torch.is_grad_enabled())))
    loss_and_gradients(m, SOME_INPUTS, SOME_TARGETS)
    assert rows == [(len(TEXTS), False), (5, True)]  # the histories hold items 0-4


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


def test_a_checkpoint_keeps_the_stale_table_so_a_resume_mid_window_reads_what_the_uninterrupted_run_reads(tiny_bert):
    m = module(tiny_bert, 3)
    optimizer = torch.optim.SGD(m.parameters(), lr=1.0)
    loss_and_gradients(m, SOME_INPUTS, SOME_TARGETS)  # encodes the table, then trains on it
    optimizer.step()
    optimizer.zero_grad()
    checkpoint = {"state_dict": {k: v.clone() for k, v in m.state_dict().items()}}
    m.on_save_checkpoint(checkpoint)
    uninterrupted = loss_and_gradients(m, SOME_INPUTS, SOME_TARGETS)  # one step into the window

    resumed = module(tiny_bert, 3)
    resumed.load_state_dict(checkpoint["state_dict"])
    resumed.on_load_checkpoint(checkpoint)
    loss, grads = loss_and_gradients(resumed, SOME_INPUTS, SOME_TARGETS)
    torch.testing.assert_close(loss, uninterrupted[0], atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], uninterrupted[1][name], atol=0, rtol=0, msg=name)
    assert resumed._stale_age == m._stale_age == 2

    re_encoded = module(tiny_bert, 3)  # without the table: encoded afresh from the trained weights
    re_encoded.load_state_dict(checkpoint["state_dict"])
    assert not torch.allclose(loss_and_gradients(re_encoded, SOME_INPUTS, SOME_TARGETS)[0], loss, atol=1e-6, rtol=1e-6)
