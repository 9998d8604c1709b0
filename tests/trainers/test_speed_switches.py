"""The speed switches change the work, not the result: `model.item.dedup=false` (encode every
occurrence, the naive recipe) gives the dedup path's loss and gradients, `model.item.dynamic_padding=false`
(run the catalogue's full token width) gives the same item vectors, length buckets
(`model.item.bucket_items`) give the same loss and gradients, `model.item.attention=eager` gives
SDPA's vectors, loss and gradients, and activation checkpointing (`model.item/user.activation_checkpointing`)
gives the same loss and gradients while it recomputes the trainable layers. Reference: the shipped path,
in eval mode so dropout draws nothing; checkpointing is compared in train mode, dropout included."""
from collections import Counter

import pytest
import torch

from twotower.configs import load_config
from twotower.modules.histories import Histories
from twotower.modules.item_text import load_tokenizer, tokenize
from twotower.modules.lit_two_tower import TwoTowerModule

TEXTS = ["sailing boats", "a guide to jazz piano chords", "x", "the quiet harbour", "knots", "tides and moons",
         "rope", "a long history of lighthouses along the northern coast"]
WIDTH = 24  # wider than any text above: fixed padding has something to pad
INPUTS = torch.tensor([[-1, -1, 0, 1, 2, 1], [3, 3, 4, 0, 1, 2], [-1, -1, -1, -1, 5, 7]])
TARGETS = torch.tensor([[-1, -1, 1, 2, 1, 6], [3, 4, 0, 1, 2, 2], [-1, -1, -1, -1, 7, 0]])


def catalogue(tiny_bert: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenize(load_tokenizer(tiny_bert), TEXTS, WIDTH)
    tokens = torch.zeros(len(ids), WIDTH, dtype=torch.long)
    for i, t in enumerate(ids):
        tokens[i, : len(t)] = torch.as_tensor(t.astype("int64"))
    return tokens, torch.tensor([len(t) for t in ids])


def module(tiny_bert: str, train_layers: int, *overrides: str, **item) -> TwoTowerModule:
    cfg = load_config([], [f"model.item.encoder={tiny_bert}", f"model.item.train_layers={train_layers}", "model.mode=text",
                           "model.dim=16", "data.max_len=6", "model.loss.num_negatives=4", *overrides,
                           *[f"model.item.{k}={str(v).lower()}" for k, v in item.items()]])
    n = len(TEXTS)
    torch.manual_seed(0)
    m = TwoTowerModule(cfg, n, torch.arange(n) + 1, torch.zeros(n, dtype=torch.bool)).eval()
    m.model.item_tower.set_catalogue(*catalogue(tiny_bert))
    m.model.item_tower.build_frozen_cache()
    return m


def rows_encoded(m: TwoTowerModule) -> list[int]:
    seen: list[int] = []
    m.model.item_tower.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    return seen


def loss_and_gradients(m: TwoTowerModule) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same negatives (and, in train mode, the same dropout masks)
    loss = m._sampled_loss(Histories.of(INPUTS), TARGETS, TARGETS >= 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def assert_same_loss_and_gradients(result, reference) -> None:
    (loss, grads), (reference_loss, reference_grads) = result, reference
    torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == reference_grads.keys() and any(n.startswith("model.item_tower.encoder") for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("train_layers", [-1, 1])  # 1: the top layer trains from the frozen-layer cache
def test_dedup_off_gives_the_same_loss_and_gradients(tiny_bert, train_layers):
    results, rows = [], []
    for dedup in (True, False):
        m = module(tiny_bert, train_layers, dedup=dedup)
        seen = rows_encoded(m)
        results.append(loss_and_gradients(m))
        rows.append(seen[0])
    assert_same_loss_and_gradients(results[1], results[0])
    dedup_rows, naive_rows = rows
    occurrences = int((INPUTS >= 0).sum() + (TARGETS >= 0).sum()) + 4
    assert naive_rows == occurrences and dedup_rows <= len(TEXTS) < naive_rows


@pytest.mark.parametrize("train_layers", [-1, 1])
def test_dynamic_padding_off_gives_the_same_vectors_with_more_tokens(tiny_bert, train_layers):
    items = torch.tensor([0, 2, 4, 6])  # short texts: dynamic padding trims most of the width
    vectors, widths = [], []
    for dynamic in (True, False):
        m = module(tiny_bert, train_layers, dynamic_padding=dynamic)
        tower = m.model.item_tower
        layer = tower.encoder.encoder.layer[-1]
        layer.register_forward_pre_hook(lambda _, args: widths.append(args[0].shape[1]))
        with torch.no_grad():
            vectors.append(tower(items))
    torch.testing.assert_close(vectors[1], vectors[0], atol=1e-5, rtol=1e-5)
    assert widths[1] == WIDTH and widths[0] == int(catalogue(tiny_bert)[1][items].max()) < WIDTH


@pytest.mark.parametrize("train_layers", [-1, 1])
def test_length_buckets_give_the_same_loss_and_gradients_with_fewer_tokens(tiny_bert, train_layers):
    results, widths = [], []
    for bucket_items in (3, 0):  # 3: eight items sorted by length, in chunks of 3, 3 and 2
        m = module(tiny_bert, train_layers, "model.loss.candidates=full", bucket_items=bucket_items)
        layer = m.model.item_tower.encoder.encoder.layer[-1]
        layer.register_forward_pre_hook(lambda _, args: widths.append(tuple(args[0].shape[:2])))
        torch.manual_seed(1)
        loss = m._full_loss(Histories.of(INPUTS), TARGETS, TARGETS >= 0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    assert_same_loss_and_gradients(results[0], results[1])
    lengths = sorted(catalogue(tiny_bert)[1].tolist())
    assert widths == [(3, lengths[2]), (3, lengths[5]), (2, lengths[7]), (len(TEXTS), lengths[7])]
    assert lengths[2] < lengths[7]  # the short chunks ran fewer tokens


def test_catalogue_vectors_in_length_order_are_each_items_own_vector(tiny_bert):
    m = module(tiny_bert, 1, bucket_items=0)
    with torch.no_grad():
        one_pass = m.model.item_tower(torch.arange(len(TEXTS)))
        torch.testing.assert_close(m.model.catalogue_vectors(3), one_pass, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train_layers", [-1, 1])  # 1: `_top_layers` feeds the layer an additive mask itself
def test_eager_attention_gives_the_same_vectors_loss_and_gradients(tiny_bert, train_layers):
    items = torch.arange(len(TEXTS))  # texts of different lengths: the padding mask matters
    results, vectors = [], []
    for attention in ("sdpa", "eager"):
        m = module(tiny_bert, train_layers, attention=attention)
        tower = m.model.item_tower
        assert tower.encoder.config._attn_implementation == attention
        with torch.no_grad():
            vectors.append(tower(items))
        results.append(loss_and_gradients(m))
    torch.testing.assert_close(vectors[1], vectors[0], atol=1e-5, rtol=1e-5)
    assert_same_loss_and_gradients(results[1], results[0])


@pytest.mark.parametrize("train_layers,cache_frozen", [(-1, False), (1, True), (1, False)])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_bert, train_layers, cache_frozen):
    """Train mode, dropout on: the recompute must draw the forward's dropout masks again. A trainable
    encoder layer or user block runs twice per step (forward, recompute); a frozen one once."""
    results, calls, trains = [], [], {}
    for checkpointing in (False, True):
        m = module(tiny_bert, train_layers, f"model.user.activation_checkpointing={str(checkpointing).lower()}",
                   cache_frozen=cache_frozen, activation_checkpointing=checkpointing).train()
        counts = Counter()
        layers = {f"encoder.{i}": layer for i, layer in enumerate(m.model.item_tower.encoder.encoder.layer)}
        layers |= {f"user.{i}": block for i, block in enumerate(m.model.user_tower.blocks)}
        for name, layer in layers.items():
            inner = layer.attention if name.startswith("encoder") else layer.out  # runs inside the checkpoint
            inner.register_forward_hook(lambda *_, name=name: counts.update([name]))
            trains[name] = any(p.requires_grad for p in layer.parameters())
        results.append(loss_and_gradients(m))
        calls.append(counts)
    assert_same_loss_and_gradients(results[1], results[0])
    plain, checkpointed = calls
    assert plain["user.0"] == 1 and plain["encoder.1"] == 1
    assert checkpointed == {name: plain[name] * (2 if trains[name] else 1) for name in plain}


def test_the_shipped_defaults_keep_the_fast_path():
    item = load_config().model.item
    assert item.dedup and item.dynamic_padding and item.cache_frozen and item.train_layers == 1
    assert item.attention == "sdpa" and not item.activation_checkpointing
    assert not load_config().model.user.activation_checkpointing
    assert load_config().trainer.precision == "32-true"
