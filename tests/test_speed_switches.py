"""The speed switches of the item tower change the work, not the result: `model.item.dedup=false`
(encode every occurrence, the naive recipe) gives the dedup path's loss and gradients, and
`model.item.dynamic_padding=false` (run the catalogue's full token width) gives the same item
vectors. Reference: the shipped path (dedup, dynamic padding), in eval mode so dropout draws nothing."""
import pytest
import torch

from configs import load_config
from datamodules.item_text import load_tokenizer, tokenize
from modules.lit_two_tower import TwoTowerModule

TEXTS = ["sailing boats", "a guide to jazz piano chords", "x", "the quiet harbour", "knots", "tides and moons",
         "rope", "a long history of lighthouses along the northern coast"]
WIDTH = 24  # wider than any text above: fixed padding has something to pad


def catalogue(tiny_bert: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenize(load_tokenizer(tiny_bert), TEXTS, WIDTH)
    tokens = torch.zeros(len(ids), WIDTH, dtype=torch.long)
    for i, t in enumerate(ids):
        tokens[i, : len(t)] = torch.as_tensor(t.astype("int64"))
    return tokens, torch.tensor([len(t) for t in ids])


def module(tiny_bert: str, train_layers: int, **item) -> TwoTowerModule:
    cfg = load_config([], [f"model.item.encoder={tiny_bert}", f"model.item.train_layers={train_layers}", "model.mode=text",
                           "model.dim=16", "data.max_len=6", "model.loss.num_negatives=4",
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


@pytest.mark.parametrize("train_layers", [-1, 1])  # 1: the top layer trains from the frozen-layer cache
def test_dedup_off_gives_the_same_loss_and_gradients(tiny_bert, train_layers):
    inputs = torch.tensor([[-1, -1, 0, 1, 2, 1], [3, 3, 4, 0, 1, 2], [-1, -1, -1, -1, 5, 7]])
    targets = torch.tensor([[-1, -1, 1, 2, 1, 6], [3, 4, 0, 1, 2, 2], [-1, -1, -1, -1, 7, 0]])
    results = []
    for dedup in (True, False):
        m = module(tiny_bert, train_layers, dedup=dedup)
        seen = rows_encoded(m)
        torch.manual_seed(1)  # the same negatives
        loss = m._sampled_loss(inputs, targets, targets >= 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, seen[0]))
    (loss, grads, dedup_rows), (naive_loss, naive_grads, naive_rows) = results
    torch.testing.assert_close(naive_loss, loss, atol=1e-5, rtol=1e-5)
    assert naive_grads.keys() == grads.keys() and any(n.startswith("model.item_tower.encoder") for n in grads)
    for name in grads:
        torch.testing.assert_close(naive_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)
    occurrences = int((inputs >= 0).sum() + (targets >= 0).sum()) + 4
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


def test_the_shipped_defaults_keep_the_fast_path():
    item = load_config().model.item
    assert item.dedup and item.dynamic_padding and item.cache_frozen and item.train_layers == 1
    assert load_config().trainer.precision == "32-true"
