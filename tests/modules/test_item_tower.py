"""The item tower: a real BERT, pooled and projected; dynamic padding changes nothing; layer
freezing does what train_layers says; the packaged MiniLM loads offline and embeds like the
reference sentence-transformers pipeline."""
import numpy as np
import pytest
import torch

from twotower.configs.schema import ItemTowerConfig
from twotower.modules.item_text import item_texts, load_tokenizer, tokenize
from twotower.modules.item_tower import ItemTower, resolve_encoder


def catalogue(tokenizer, texts, max_len=16):
    ids = tokenize(tokenizer, texts, max_len)
    lengths = torch.tensor([len(t) for t in ids])
    tokens = torch.zeros(len(ids), max_len, dtype=torch.long)
    for i, t in enumerate(ids):
        tokens[i, : len(t)] = torch.from_numpy(t.astype(np.int64))
    return tokens, lengths


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_dynamic_padding_gives_the_same_vectors_as_full_padding(tiny_bert, pooling):
    tower = ItemTower(ItemTowerConfig(encoder=tiny_bert, pooling=pooling, train_layers=-1), "id+text", 3, 8).eval()
    tokens, lengths = catalogue(load_tokenizer(tiny_bert), ["a short one", "a rather longer title about sailing boats", "x"])
    tower.set_catalogue(tokens, lengths)
    items = torch.tensor([0, 2])  # both short: forward trims the padding to their longest text
    mask = (torch.arange(tokens.shape[1]) < lengths[items, None]).long()
    full = tower.encode_text(tokens[items], mask) + tower.id_embedding(items)
    torch.testing.assert_close(tower(items), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train_layers,expected", [(-1, "all"), (0, "none"), (1, "top")])
def test_train_layers_freezes_the_rest(tiny_bert, train_layers, expected):
    tower = ItemTower(ItemTowerConfig(encoder=tiny_bert, train_layers=train_layers), "text", 3, 8)
    trainable = {n for n, p in tower.encoder.named_parameters() if p.requires_grad}
    if expected == "all":
        assert trainable == {n for n, _ in tower.encoder.named_parameters()}
    elif expected == "none":
        assert not trainable
    else:
        assert trainable and all(n.startswith("encoder.layer.1.") for n in trainable)
    assert all(p.requires_grad for p in tower.projection.parameters())


def test_id_mode_has_no_encoder():
    tower = ItemTower(ItemTowerConfig(), "id", 5, 8)
    assert tower.encoder is None and tower(torch.tensor([0, 4])).shape == (2, 8)


def test_packaged_minilm_mean_pooling_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    path = resolve_encoder("minilm")
    tower = ItemTower(ItemTowerConfig(encoder="minilm", pooling="mean"), "text", 2, 8).eval()
    tokenizer = load_tokenizer("minilm")
    texts = ["title: Toy Story (1995); text: Animation|Children's|Comedy", "title: Heat (1995)"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = tower.encoder(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    reference = SentenceTransformer(path, device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert tower.encoder.config.num_hidden_layers == 6 and tower.encoder.config.hidden_size == 384


def test_item_text_names_each_field_and_skips_empty_ones():
    import pandas as pd

    items = pd.DataFrame({"title": ["Heat", "Up", " Big "], "genres": ["Crime", None, float("nan")], "year": [1995, 2009, pd.NA]})
    expected = ["title: Heat; genres: Crime; year: 1995", "title: Up; year: 2009", "title: Big"]
    assert item_texts(items.astype({"year": "Int64"}).to_dict("records"), ["title", "genres", "year"]) == expected
    # the server's records are plain dicts: a field may be absent
    assert item_texts([{"title": "Up", "year": 2009}, {"genres": ""}], ["title", "genres", "year"]) == ["title: Up; year: 2009", ""]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_mapped", [False, True])
@pytest.mark.parametrize("train_layers", [0, 1])
def test_frozen_layer_cache_gives_the_same_vectors_and_gradients_reach_the_top(tiny_bert, train_layers, memory_mapped, dtype, tmp_path):
    """Also with bf16 weights, as DeepSpeed's bf16 casts every parameter: the cache is hashed and
    written whatever the dtype (numpy has no bfloat16), and a bf16 state read back from the float32
    file is exact, so cached and plain towers agree to the bit."""
    cfg = dict(encoder=tiny_bert, train_layers=train_layers, frozen_cache_dir=str(tmp_path) if memory_mapped else None)
    tokens, lengths = catalogue(load_tokenizer(tiny_bert), ["sailing boats", "a guide to jazz piano chords", "x y z"])
    torch.manual_seed(0)
    cached = ItemTower(ItemTowerConfig(**cfg, cache_frozen=True), "text", 3, 8).eval().to(dtype)
    plain = ItemTower(ItemTowerConfig(**cfg, cache_frozen=False), "text", 3, 8).eval().to(dtype)
    plain.load_state_dict(cached.state_dict())
    for tower in (cached, plain):
        tower.set_catalogue(tokens, lengths)
    cached.build_frozen_cache()
    assert cached.frozen_cache is not None and plain.frozen_cache is None
    # Fully frozen: one pooled vector per item; else every token's state after the frozen layers.
    hidden = cached.encoder.config.hidden_size
    assert cached.frozen_cache.shape == ((3, hidden) if train_layers == 0 else (*tokens.shape, hidden))
    assert [p.suffix for p in tmp_path.iterdir()] == ([".npy"] if memory_mapped else [])
    assert cached.frozen_cache.device.type == "cpu"  # in host memory, whatever the device
    items = torch.tensor([2, 0, 1])
    out = cached(items)
    assert out.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(out, plain(items))
    else:
        torch.testing.assert_close(out, plain(items), atol=1e-5, rtol=1e-5)
    out.float().sum().backward()
    top = [p for n, p in cached.encoder.named_parameters() if n.startswith("encoder.layer.1.")]
    assert all((p.grad is not None) == (train_layers == 1) for p in top)


@pytest.mark.parametrize("cache_frozen", [False, True])
def test_mlp_text_adapter_runs_before_the_projection(tiny_bert, cache_frozen):
    """model.item.text_adapter=mlp: projection(GELU(W pooled + b)), on the plain and the pooled-cache path."""
    tower = ItemTower(ItemTowerConfig(encoder=tiny_bert, train_layers=0, cache_frozen=cache_frozen,
                                      text_adapter="mlp"), "text", 3, 8).eval()
    tokens, lengths = catalogue(load_tokenizer(tiny_bert), ["sailing boats", "a guide to jazz piano chords", "x y z"])
    tower.set_catalogue(tokens, lengths)
    tower.build_frozen_cache()
    assert (tower.frozen_cache is not None) == cache_frozen
    with torch.no_grad():
        mask = (torch.arange(tokens.shape[1]) < lengths[:, None]).double()
        hidden = tower.encoder(input_ids=tokens, attention_mask=mask.long()).last_hidden_state.double()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        inner, outer = tower.adapter[0], tower.projection
        adapted = torch.nn.functional.gelu(pooled @ inner.weight.double().T + inner.bias.double())
        expected = adapted @ outer.weight.double().T + outer.bias.double()
        items = torch.tensor([2, 0, 1])
        torch.testing.assert_close(tower(items).double(), expected[items], atol=1e-5, rtol=1e-5)


def test_id_dropout_trains_some_items_on_their_text_alone(tiny_bert):
    """model.item.id_dropout: in training, each item vector is text + ID or, with that
    probability, text alone; in evaluation always text + ID."""
    cfg = ItemTowerConfig(encoder=tiny_bert, train_layers=0, id_dropout=0.5)
    tower = ItemTower(cfg, "id+text", 200, 8)
    tower.encoder.eval()  # no encoder dropout: the text part is deterministic
    tower.set_catalogue(*catalogue(load_tokenizer(tiny_bert), [f"item number {i}" for i in range(200)]))
    items = torch.arange(200)
    with torch.no_grad():
        mask = (torch.arange(tower.tokens.shape[1]) < tower.lengths[:, None]).long()
        text, ids = tower.encode_text(tower.tokens, mask), tower.id_embedding(items)
        torch.manual_seed(0)
        trained = tower(items)
        tower.eval()
        evaluated = tower(items)
    text_alone = torch.isclose(trained, text, atol=1e-6).all(1)
    with_id = torch.isclose(trained, text + ids, atol=1e-6).all(1)
    assert (text_alone ^ with_id).all()  # every row is exactly one of the two
    assert 70 <= int(text_alone.sum()) <= 130  # about half of 200 (binomial sd 7)
    torch.testing.assert_close(evaluated, text + ids, atol=1e-6, rtol=1e-6)


def test_a_memory_mapped_cache_is_reused_only_for_the_same_catalogue_and_frozen_weights(tiny_bert, tmp_path):
    tokenizer = load_tokenizer(tiny_bert)

    def build(texts, seed=0):
        torch.manual_seed(seed)
        tower = ItemTower(ItemTowerConfig(encoder=tiny_bert, train_layers=1, frozen_cache_dir=str(tmp_path)), "text", len(texts), 8)
        tower.set_catalogue(*catalogue(tokenizer, texts))
        tower.build_frozen_cache()
        return tower

    first = build(["sailing boats", "jazz piano"])
    files = sorted(tmp_path.iterdir())
    build(["sailing boats", "jazz piano"], seed=1)  # other top layers and projection: same frozen cache
    assert sorted(tmp_path.iterdir()) == files
    build(["sailing boats", "jazz organ"])
    changed = build(["sailing boats", "jazz piano"])
    with torch.no_grad():
        changed.encoder.embeddings.word_embeddings.weight.mul_(2)  # other frozen weights
    changed.set_catalogue(first.tokens, first.lengths)
    changed.build_frozen_cache()
    assert len(list(tmp_path.iterdir())) == 3 and not list(tmp_path.glob("*partial*"))
    assert not torch.allclose(changed.frozen_cache, first.frozen_cache)


def test_items_without_a_trained_id_row_get_the_new_item_head(tiny_bert):
    """id+text with a new-item head (model.loss.cold_weight): items marked untrained (held out),
    `text_only` vectors and `encode_new` (serving's new items) are the head's output on the pooled
    text; items appended later (`twotower learn`) have their own rows, which train."""
    tower = ItemTower(ItemTowerConfig(encoder=tiny_bert, train_layers=0), "id+text", 4, 8)
    tower.add_new_item_head()
    tower.eval()
    tokenizer = load_tokenizer(tiny_bert)
    tower.set_catalogue(*catalogue(tokenizer, ["red pen", "blue stapler", "green paper", "ink"]))
    tower.untrained = torch.tensor([False, True, False, False])
    with torch.no_grad():
        mask = (torch.arange(tower.tokens.shape[1]) < tower.lengths[:, None]).double()
        hidden = tower.encoder(input_ids=tower.tokens.long(), attention_mask=mask.long()).last_hidden_state.double()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        inner, outer = tower.cold_head[0], tower.cold_head[2]
        new = torch.nn.functional.gelu(pooled @ inner.weight.double().T + inner.bias.double()) @ outer.weight.double().T + outer.bias.double()
        items = torch.arange(4)
        trained = tower.encode_text(tower.tokens.long(), mask.long()) + tower.id_embedding.weight
        expected = torch.where(tower.untrained[:, None], new.float(), trained)
        torch.testing.assert_close(tower(items), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tower(items, text_only=True).double(), new, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tower.encode_new(tower.tokens.long(), mask.long()).double(), new, atol=1e-5, rtol=1e-5)
        tower.append_catalogue(*catalogue(tokenizer, ["new lamp"]))
        added = torch.tensor([4])
        rows = tower.new_item_rows(added)  # `twotower learn` starts the new item's own row there
        tower.id_embedding = torch.nn.Embedding.from_pretrained(torch.cat([tower.id_embedding.weight, rows]))
        torch.testing.assert_close(tower(added), tower(added, text_only=True), atol=1e-6, rtol=1e-6)
    assert tower.untrained.tolist() == [False, True, False, False, False]
    text_mode = ItemTower(ItemTowerConfig(encoder=tiny_bert), "text", 4, 8)
    text_mode.add_new_item_head()
    assert text_mode.cold_head is None


def test_vectors_and_new_item_vectors_come_from_one_encoder_pass(tiny_bert):
    """The new-item head's training reads both vectors of each candidate (`from_pooled`):
    they equal the two `forward` calls, with the trainable top layer run once, not twice."""
    tower = ItemTower(ItemTowerConfig(encoder=tiny_bert, train_layers=1), "id+text", 4, 8)
    tower.add_new_item_head()
    tower.eval()
    tower.set_catalogue(*catalogue(load_tokenizer(tiny_bert), ["red pen", "blue stapler", "green paper", "ink"]))
    tower.untrained = torch.tensor([False, True, False, False])
    calls = []
    tower.encoder.encoder.layer[-1].register_forward_hook(lambda *_: calls.append(1))
    items = torch.tensor([3, 1, 0])
    with torch.no_grad():
        vectors, new = tower.from_pooled(items, tower.pooled(items))
        assert len(calls) == 1
        torch.testing.assert_close(vectors, tower(items), atol=0, rtol=0)
        torch.testing.assert_close(new, tower(items, text_only=True), atol=0, rtol=0)
    assert len(calls) == 3
